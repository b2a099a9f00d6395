"""The training loop end to end: it learns, resumes bit for bit, freezes prototypes, logs and counts.

Real runs through ``openseer.commands.main`` on a Fashion-MNIST subset (or a folder of generated PNGs),
with timm's tiny test ResNet and small crops so each run takes seconds on two CPU cores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from openseer.commands import main
from openseer.config import build_config, load_config, to_dict
from openseer.model.swav import build_swav
from openseer.train.checkpoint import latest_checkpoint, list_checkpoints
from openseer.train.loop import pretrain
from openseer.train.optim import lr_at
from tests.conftest import FAST, fmnist_available, png_bytes, write_pngs


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _cli(*args: str) -> None:
    assert main(["pretrain", *args]) == 0


# ---------------------------------------------------------------- learning


# 2048 images, batch 128: 16 steps per epoch, 3 epochs. The tiny-cpu head (512 -> 128) and a high LR
# (LARC keeps each step at lr * trust of the weight norm) bring the loss well below ln K in 48 steps.
LEARN = [*FAST, "data.limit=2048", "data.batch_size=128", "optim.epochs=3", "optim.base_lr=4.8", "log.every=4",
         "checkpoint.every=1000", "model.head_hidden=[512]", "model.head_out=128"]


@pytest.mark.slow
@fmnist_available
def test_pretrain_on_fashion_mnist_learns(tmp_path):
    run = tmp_path / "run"
    _cli("--data", "fashion-mnist", "--out", str(run), *LEARN)

    rows = _metrics(run)
    assert [r["step"] for r in rows] == list(range(4, 49, 4))
    for r in rows:
        assert {"step", "loss", "lr", "imgs_per_s"} <= set(r)
        assert math.isfinite(r["loss"]) and r["imgs_per_s"] > 0 and r["lr"] > 0
    lnk = math.log(30)
    assert rows[0]["loss"] > 0.95 * lnk  # starts near ln K ...
    assert rows[-1]["loss"] < 0.9 * lnk  # ... and ends clearly below it: no collapse
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    assert rows[-1]["prototypes_used"] > 15

    # the LR of the last step is the end of the cosine: final_lr_ratio * peak
    cfg = load_config(run / "config.yaml")
    peak = cfg.optim.base_lr * 128 / 256
    assert rows[-1]["lr"] == pytest.approx(cfg.optim.final_lr_ratio * peak)
    assert max(r["lr"] for r in rows) <= peak + 1e-12

    # config.yaml is the resolved config: recipe + --data + every override, loadable as is
    expected = build_config("tiny-cpu", LEARN, base={"data": {"source": "fashion-mnist"}})
    assert to_dict(cfg) == to_dict(expected)
    raw = yaml.safe_load((run / "config.yaml").read_text())
    assert raw["model"]["arch"] == "test_resnet" and raw["data"]["limit"] == 2048
    assert raw["optim"]["warmup_steps"] == 4 and raw["swav"]["n_prototypes"] == 30

    # the final checkpoint holds the last step
    path, state = latest_checkpoint(run)
    assert state["step"] == 48 and path.name == "step_00000048.pt"


# ---------------------------------------------------------------- resume


RESUME = [*FAST, "data.limit=512", "data.batch_size=64", "optim.epochs=2", "log.every=1", "checkpoint.every=5",
          "checkpoint.keep=10", "swav.queue_length=128", "swav.queue_start_step=2", "swav.freeze_prototypes_steps=3"]


@pytest.mark.slow
@fmnist_available
def test_stop_and_resume_equals_one_uninterrupted_run(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _cli("--data", "fashion-mnist", "--out", str(whole), *RESUME)
    _cli("--data", "fashion-mnist", "--out", str(parts), "--max-steps", "7", *RESUME)
    _, stopped = latest_checkpoint(parts)
    assert stopped["step"] == 7  # --max-steps writes a checkpoint where it stops
    assert int(stopped["queue"]["filled"]) == 128  # the queue filled up before the stop
    _cli("--resume", str(parts))

    (pa, a), (pb, b) = latest_checkpoint(whole), latest_checkpoint(parts)
    assert a["step"] == b["step"] == 16 and pa.name == pb.name
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key  # bit-identical weights
    assert torch.equal(a["queue"]["embeddings"], b["queue"]["embeddings"])
    assert a["queue"]["filled"] == b["queue"]["filled"] == 128
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"])

    ma, mb = _metrics(whole), _metrics(parts)
    assert [r["step"] for r in mb] == [r["step"] for r in ma] == list(range(1, 17))  # no gap, no repeat
    assert [r["lr"] for r in mb] == [r["lr"] for r in ma]
    assert [r["loss"] for r in mb] == [r["loss"] for r in ma]  # the same batches, crops and updates
    cfg = load_config(parts / "config.yaml")
    assert mb[-1]["lr"] == lr_at(15, 16, cfg.optim.base_lr * 64 / 256, cfg.optim.warmup_steps, cfg.optim.warmup_start_ratio,
                                 cfg.optim.final_lr_ratio)


# ---------------------------------------------------------------- prototypes


def _png_run_args(folder: Path, *extra: str) -> list[str]:
    return ["--data", str(folder), *FAST, "data.batch_size=8", "optim.epochs=1", "log.every=1", *extra]


def _prototype_index(cfg) -> int:
    model = build_swav(cfg)
    ids = [id(p) for p in model.parameters()]
    return ids.index(id(model.prototypes.layer.weight))


def test_prototypes_get_no_update_at_all_while_frozen(tmp_path):
    folder = tmp_path / "imgs"
    write_pngs(folder, 24, size=(28, 28))
    run = tmp_path / "run"
    _cli(*_png_run_args(folder, "swav.freeze_prototypes_steps=100"), "--out", str(run))
    _, state = latest_checkpoint(run)
    assert state["step"] == 3
    cfg = load_config(run / "config.yaml")
    torch.manual_seed(cfg.seed)
    initial = build_swav(cfg).prototypes.layer.weight.detach()
    saved = state["model"]["prototypes.layer.weight"]
    assert torch.equal(saved, initial)  # same bits after 3 steps
    idx = _prototype_index(cfg)
    opt_state = state["optimizer"]["state"]
    assert idx not in opt_state or "momentum_buffer" not in opt_state[idx]  # no momentum, no decay
    assert any("momentum_buffer" in s for s in opt_state.values())  # while the rest trained
    head = "head.mlp.0.weight"
    torch.manual_seed(cfg.seed)
    assert not torch.equal(state["model"][head], build_swav(cfg).state_dict()[head])


def test_prototypes_train_after_the_freeze_and_stay_unit_norm(tmp_path):
    folder = tmp_path / "imgs"
    write_pngs(folder, 24, size=(28, 28))
    run = tmp_path / "run"
    _cli(*_png_run_args(folder, "swav.freeze_prototypes_steps=1"), "--out", str(run))
    _, state = latest_checkpoint(run)
    cfg = load_config(run / "config.yaml")
    torch.manual_seed(cfg.seed)
    initial = build_swav(cfg).prototypes.layer.weight.detach()
    saved = state["model"]["prototypes.layer.weight"]
    assert not torch.equal(saved, initial)
    assert torch.allclose(saved.norm(dim=1), torch.ones(len(saved)), atol=1e-5)
    assert "momentum_buffer" in state["optimizer"]["state"][_prototype_index(cfg)]


# ---------------------------------------------------------------- data problems during a run


def test_bad_files_in_a_run_are_skipped_counted_and_listed(tmp_path, capsys):
    folder = tmp_path / "imgs"
    write_pngs(folder, 16, size=(28, 28))
    (folder / "img003_zero.jpg").write_bytes(b"")
    (folder / "img007_text.jpg").write_text("just text")
    good = png_bytes(5)
    (folder / "img011_trunc.png").write_bytes(good[: len(good) // 2])
    run = tmp_path / "run"
    cfg = build_config("tiny-cpu", [*FAST, "data.batch_size=19", "optim.epochs=2", "log.every=1"],
                       base={"data": {"source": str(folder)}})
    summary = pretrain(cfg, run)
    assert summary["step"] == 2
    assert summary["counters"]["bad_images"] == {"empty": 2, "not_an_image": 2, "truncated": 2}
    listed = (run / "bad_images.txt").read_text().splitlines()
    assert sorted(listed) == sorted(["empty\timg003_zero.jpg", "not_an_image\timg007_text.jpg",
                                     "truncated\timg011_trunc.png"] * 2)
    assert _metrics(run)[-1]["bad_images"] == 6
    assert "skipped unreadable images" in capsys.readouterr().out


def test_checkpoint_rotation_in_a_run(tmp_path):
    folder = tmp_path / "imgs"
    write_pngs(folder, 8, size=(28, 28))
    run = tmp_path / "run"
    _cli("--data", str(folder), *FAST, "data.batch_size=4", "optim.epochs=3", "checkpoint.every=1",
         "checkpoint.keep=2", "--out", str(run))
    assert [p.name for p in list_checkpoints(run)] == ["step_00000005.pt", "step_00000006.pt"]
    assert not any(p.name.endswith(".tmp") for p in (run / "checkpoints").iterdir())


# ---------------------------------------------------------------- time budget


@fmnist_available
def test_a_time_budget_ends_the_run_and_the_schedule_on_the_clock(tmp_path):
    """optim.minutes: the run stops when the budget is spent, its last step at the final LR; a resume
    of the finished run trains no further."""
    run = tmp_path / "run"
    args = ["--data", "fashion-mnist", "--out", str(run), *FAST, "data.limit=512", "data.batch_size=32",
            "optim.epochs=1000", "optim.minutes=0.1", "optim.warmup_steps=2", "log.every=1"]
    _cli(*args)
    rows = _metrics(run)
    _, state = latest_checkpoint(run)
    spent = state["counters"]["train_seconds"]
    assert 6.0 <= spent < 30.0  # stopped on the clock (6 s), not by the 16,000-step schedule
    assert state["step"] == rows[-1]["step"] < 16_000
    assert len(rows) >= 4
    cfg = load_config(run / "config.yaml")
    peak = cfg.optim.base_lr * 32 / 256
    # the cosine followed the clock down (the 16,000-step schedule alone would still be at the peak);
    # the last step's LR is set from the time spent before it, so a slow step leaves it a little above
    assert rows[-1]["lr"] < 0.2 * peak
    after = [r["lr"] for r in rows[2:]]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert json.loads((run / "schedule.json").read_text())["minutes"] == 0.1

    assert main(["pretrain", "--resume", str(run)]) == 0  # budget already spent: nothing more to do
    _, again = latest_checkpoint(run)
    assert again["step"] == state["step"] and len(_metrics(run)) == len(rows)


def test_resume_trims_metrics_past_the_checkpoint_in_one_atomic_replace(tmp_path, monkeypatch):
    """Lines after the resumed step and lines torn by a crash go; the rest survive even a kill mid-rewrite,
    because the kept lines are written aside and swapped in with one rename."""
    import os

    from openseer import rundir

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7)) + '{"step": 7, "lo')
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append((Path(a).name, Path(b).name)),
                                                     real_replace(a, b)))
    rundir.truncate_metrics(tmp_path, 4)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4]
    assert [b for _, b in renamed] == ["metrics.jsonl"] and renamed[0][0].startswith(".metrics.jsonl.")
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]
