"""Runs that behave: a time budget counts training only (a compile is kept off it), a resume can make
a finished run longer with its schedule continued, a refused start leaves nothing behind, a small
pile trains with the batch it fills, and a recipe that does not fit the run is warned about.

Real runs through ``openseer.commands.main`` on folders of generated PNGs, with timm's tiny test
ResNet (tests/conftest.py FAST), a few seconds each on two CPU cores.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from openseer.commands import main
from openseer.config import load_config
from openseer.train.checkpoint import latest_checkpoint
from openseer.train.faults import SLOW_FIRST_STEP_ENV
from openseer.train.optim import lr_at, scheduled_lr
from tests.conftest import FAST, write_pngs


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("runs") / "imgs"
    write_pngs(folder, 64, size=(28, 28))
    return folder


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _args(images: Path, run: Path, *extra: str) -> list[str]:
    return ["pretrain", "--data", str(images), "--out", str(run), *FAST, "data.batch_size=8", "log.every=1",
            *extra]


# ---------------------------------------------------------------- the budget counts training only


def test_a_slow_first_step_standing_for_a_compile_is_kept_off_the_budget(images, tmp_path, monkeypatch, capsys):
    """A 1.5-second budget and a first step that takes 2.5 s (as a compile would): the run still trains
    for its 1.5 seconds, and the 2.5 s are reported apart."""
    monkeypatch.setenv(SLOW_FIRST_STEP_ENV, "2.5")
    run = tmp_path / "run"
    assert main(_args(images, run, "optim.epochs=1000", "optim.minutes=0.025", "checkpoint.every=1000")) == 0
    _, state = latest_checkpoint(run)
    counters = state["counters"]
    assert counters["compile_seconds"] >= 2.5  # the slow first step, reported apart ...
    assert 1.5 <= counters["train_seconds"] < 1.5 + 2.5  # ... and not counted in the budget
    assert state["step"] >= 2  # it trained on after the slow step (counted, that step alone ends the run)
    log = capsys.readouterr()
    assert "left out of the rate, the ETA and the time budget (optim.minutes)" in log.out + log.err
    assert "compiled in" in log.out + log.err


def test_auto_compile_is_skipped_when_the_budget_cannot_pay_it_back(monkeypatch):
    from openseer.train import hardware
    from tests.conftest import tiny_config

    monkeypatch.setattr(hardware.shutil, "which", lambda name: "/usr/bin/g++")
    cpu = torch.device("cpu")
    short, notes = hardware.resolve_auto(tiny_config("model.compile=auto", "optim.minutes=2"), cpu)
    assert short.model.compile is False
    assert "a 2-minute budget cannot pay back a first compile" in notes[-1]
    long, _ = hardware.resolve_auto(tiny_config("model.compile=auto", "optim.minutes=15"), cpu)
    assert long.model.compile is True
    unbudgeted, _ = hardware.resolve_auto(tiny_config("model.compile=auto"), cpu)
    assert unbudgeted.model.compile is True


# ---------------------------------------------------------------- resume extends a run


EXTEND = ("optim.epochs=1", "optim.warmup_steps=2", "swav.freeze_prototypes_steps=2", "checkpoint.every=1000")


def test_resume_extends_a_finished_run_and_the_schedule_continues(images, tmp_path, capsys):
    """8 steps (1 epoch), finished; --resume with optim.epochs=4 trains on to step 32: the LR ramps up
    from where it stopped to the longer cosine (no restart of the warm-up, no jump), follows that
    cosine to the final LR, and the new length is in config.yaml and schedule.json. A plain resume of
    the finished run says it is complete and how to extend it."""
    run = tmp_path / "run"
    assert main(_args(images, run, *EXTEND)) == 0
    first = _metrics(run)
    assert [r["step"] for r in first] == list(range(1, 9))
    capsys.readouterr()

    assert main(["pretrain", "--resume", str(run)]) == 0  # plain: nothing to do, and it says what to do
    out = capsys.readouterr().out
    assert "the run is complete at step 8 (all 8 steps are done)" in out
    assert f"openseer pretrain --resume {run} optim.epochs=2" in out
    assert len(_metrics(run)) == 8
    from openseer.use.doctor import diagnose

    advice = [f.fix for f in diagnose(run) if f.what == "finished: all 8 steps done"]
    assert advice and f"openseer pretrain --resume {run} optim.epochs=2" in advice[0]  # doctor says the same

    assert main(["pretrain", "--resume", str(run), "optim.epochs=4"]) == 0
    out = capsys.readouterr().out
    assert "extending the run at step 8 (optim.epochs 1 -> 4; 32 steps planned)" in out
    rows = _metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 33))
    assert rows[:8] == first  # the first steps are kept as they were
    cfg = load_config(run / "config.yaml")
    assert cfg.optim.epochs == 4  # the run's config says how long it now is
    sched = json.loads((run / "schedule.json").read_text())
    assert sched["total_steps"] == 32 and sched["extended"][0]["at_step"] == 8
    peak, final = sched["peak_lr"], cfg.optim.final_lr_ratio

    def cosine(step: int) -> float:
        return lr_at(step, 32, peak, 2, 0.0, final)

    stopped = first[-1]["lr"]
    assert stopped == pytest.approx(final * peak)
    lrs = [r["lr"] for r in rows[8:]]
    # the re-warm climbs from where the run stopped (no jump to the cosine, no warm-up from zero) ...
    assert stopped < lrs[0] < cosine(8) and sched["rewarm"] == {"step": 8, "lr": stopped, "steps": 2}
    # ... then follows the 32-step cosine down to the final LR
    for step, lr in zip(range(9, 32), lrs[1:]):
        assert lr == pytest.approx(cosine(step))
    assert lrs[-1] == pytest.approx(final * peak)
    assert all(math.isfinite(r["loss"]) for r in rows)
    _, state = latest_checkpoint(run)
    assert state["step"] == 32 and state["schedule"]["rewarm"]["step"] == 8


def test_a_plain_resume_of_an_extended_run_stays_bit_exact(images, tmp_path):
    """Extended in one go, or extended, stopped at step 12 and resumed: the same weights and LRs."""
    a, b = tmp_path / "a", tmp_path / "b"
    for run in (a, b):
        assert main(_args(images, run, *EXTEND)) == 0
    assert main(["pretrain", "--resume", str(a), "optim.epochs=2"]) == 0
    assert main(["pretrain", "--resume", str(b), "optim.epochs=2", "--max-steps", "12"]) == 0
    assert main(["pretrain", "--resume", str(b)]) == 0
    (_, sa), (_, sb) = latest_checkpoint(a), latest_checkpoint(b)
    assert sa["step"] == sb["step"] == 16
    for key, tensor in sa["model"].items():
        assert torch.equal(tensor, sb["model"][key]), key
    assert [r["lr"] for r in _metrics(a)] == [r["lr"] for r in _metrics(b)]
    assert [r["loss"] for r in _metrics(a)] == [r["loss"] for r in _metrics(b)]


def test_resume_may_not_shorten_a_run(images, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(images, run, "optim.epochs=1", "--max-steps", "1")) == 0
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(run), "optim.epochs=0.5"]) == 2
    assert "extend a run, not shorten it" in capsys.readouterr().err


def test_scheduled_lr_ramps_over_the_rewarm_and_is_lr_at_elsewhere():
    sched = {"total_steps": 20, "peak_lr": 1.0}

    from openseer.config import OptimConfig

    optim = OptimConfig(warmup_steps=2, warmup_start_ratio=0.0, final_lr_ratio=0.001)
    plain = [scheduled_lr(sched, optim, t) for t in range(20)]
    assert plain == [lr_at(t, 20, 1.0, 2, 0.0, 0.001) for t in range(20)]
    ramped = {**sched, "rewarm": {"step": 10, "lr": 0.01, "steps": 4}}
    lrs = [scheduled_lr(ramped, optim, t) for t in range(20)]
    assert lrs[:10] == plain[:10] and lrs[13:] == plain[13:]
    assert 0.01 < lrs[10] < lrs[11] < lrs[12] < plain[12]


# ---------------------------------------------------------------- a refused start


def test_a_refused_start_leaves_nothing_and_the_same_command_then_runs(images, tmp_path, capsys, monkeypatch):
    """The start fails during set-up, after the run directory was written (here: the first step
    raises); nothing is left, so the very same command works once the cause is gone."""
    from openseer.rundir import RunError
    from openseer.train import faults

    run = tmp_path / "run"
    argv = _args(images, run, "optim.epochs=1", "--max-steps", "1")

    class Refuse:
        def __init__(self, method):
            self.method = method

        def __getattr__(self, name):
            return getattr(self.method, name)

        def forward_backward(self, *a, **k):
            from openseer.data.decode import DataError

            raise DataError("refused for the test")

    real = faults.from_env

    def refuse_in_setup(method):  # the method is built after the run directory was written
        raise RunError("refused during set-up for the test")

    monkeypatch.setattr(faults, "from_env", refuse_in_setup)
    assert main(argv) == 2
    assert "refused during set-up for the test" in capsys.readouterr().err
    assert not run.exists()  # nothing half-made

    monkeypatch.setattr(faults, "from_env", lambda method: Refuse(real(method)))
    assert main(argv) == 2
    assert "refused for the test" in capsys.readouterr().err
    assert not run.exists()

    kept = tmp_path / "kept"  # an --out that already held other files keeps exactly those
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert main(_args(images, kept, "optim.epochs=1", "--max-steps", "1")) == 2
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]

    monkeypatch.setattr(faults, "from_env", real)
    assert main(argv) == 0  # the same command, now that the cause is gone
    assert latest_checkpoint(run)[1]["step"] == 1


# ---------------------------------------------------------------- small piles and recipes that do not fit


def test_a_six_image_pile_trains_at_a_batch_256_request(tmp_path, capsys):
    folder = tmp_path / "six"
    write_pngs(folder, 6, size=(28, 28))  # 6 images, a batch of 256 asked for
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(folder), "--out", str(run), *FAST, "data.batch_size=256",
                 "optim.epochs=2"]) == 0
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if "fewer than data.batch_size=256" in x]
    assert len(lines) == 1 and "training with a global batch of 6 (recorded in config.yaml)" in lines[0]
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["batch_size"] == 6
    assert latest_checkpoint(run)[1]["step"] == 2


def test_a_scaled_down_seer_recipe_is_warned_about_before_training(tmp_path, capsys):
    """seer-rg32 on 8 images of 900 x 700 px with a small budget: its 8,000 warm-up steps and 313 frozen
    steps outlast the run, its 160-px crops are far smaller than the images, and the LR it will
    reach is said (not the planned peak). Training itself is cut to one step."""
    folder = tmp_path / "photos"
    write_pngs(folder, 8, size=(900, 700))
    run = tmp_path / "run"
    tiny_model = [x for x in FAST if x.split("=")[0] in ("model.arch", "model.head_hidden", "model.head_out",
                                                         "model.compile", "optim.precision", "data.num_workers")]
    assert main(["pretrain", "--data", str(folder), "--recipe", "seer-rg32", "--out", str(run), *tiny_model,
                 "log.progress=false", "log.tensorboard=false", "crops.sizes=[32,16]", "data.batch_size=8",
                 "swav.n_prototypes=30", "optim.minutes=0.5", "--max-steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: optim.warmup_steps=8000 outlasts the run's 1 steps" in out
    assert "WARNING: swav.freeze_prototypes_steps=313 outlasts the run's 1 steps" in out
    assert "WARNING: the images are about 700 px on their short side, 21x the 32-px large crops" in out
    assert "use a recipe for photographs (photos-cpu" in out and f"openseer shard {folder} --out SHARDS" in out
    # the batch is 8: the planned peak is 0.3 * 8 / 256; step 0 of the warm-up is 1/64 of it
    assert "LR up to 0.0001465 (the planned peak 0.009375 comes after the warm-up" in out
    assert "peak LR" not in out


def test_one_shard_feeds_fewer_loader_slots_instead_of_a_refusal(images, tmp_path, capsys):
    """`openseer shard` of a small pile makes one shard; data.num_workers=2 asks for two loader slots:
    the run uses one, says so, and trains."""
    from openseer.data.shards import write_shards

    write_shards(images, tmp_path / "shards", shard_size=1000)
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(tmp_path / "shards"), "--out", str(run),
                 *[x for x in FAST if not x.startswith("data.num_workers")], "data.num_workers=2",
                 "data.batch_size=8", "optim.epochs=1", "--max-steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "1 shard(s) for 1 rank(s): 1 loader slot(s) per rank instead of data.num_workers=2" in err
    assert latest_checkpoint(run)[1]["step"] == 2


def test_one_shard_resumes_bit_exact_from_the_end_of_a_pass(images, tmp_path):
    """64 samples in one shard, batch 8: step 8 ends a pass exactly; a run stopped there resumes (it
    once found 'no usable sample': the restored stream had an empty tail) and equals an unbroken run."""
    from openseer.data.shards import write_shards

    write_shards(images, tmp_path / "shards", shard_size=1000)
    args = ["--data", str(tmp_path / "shards"), *FAST, "data.batch_size=8", "optim.epochs=2", "log.every=1",
            "checkpoint.every=1000"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(["pretrain", *args, "--out", str(whole), "--max-steps", "11"]) == 0
    assert main(["pretrain", *args, "--out", str(parts), "--max-steps", "8"]) == 0
    assert main(["pretrain", "--resume", str(parts), "--max-steps", "11"]) == 0
    (_, a), (_, b) = latest_checkpoint(whole), latest_checkpoint(parts)
    assert a["step"] == b["step"] == 11
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key


# ---------------------------------------------------------------- what a person reads


@pytest.mark.parametrize("budget", [[], ["optim.minutes=5", "optim.epochs=1000"]])
def test_every_progress_line_has_the_step_and_the_loss(images, tmp_path, monkeypatch, capsys, budget):
    """Plain progress lines (a log file): the first one and every one after carry the loss, and the
    step (the fraction for a step schedule, ``step=`` under a time budget, where the line counts seconds)."""
    monkeypatch.setenv("OPENSEER_PROGRESS", "lines")
    monkeypatch.setenv("OPENSEER_PROGRESS_EVERY", "0")
    run = tmp_path / "run"
    assert main(_args(images, run, "optim.epochs=1", "log.progress=true", "log.every=10", "--max-steps", "3",
                      *budget)) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("pretrain: ")
             and "compil" not in x]
    assert len(lines) >= 3, lines
    for i, line in enumerate(lines[:3], start=1):
        assert "loss=" in line, line
        assert (f"step={i}" in line) if budget else line.startswith(f"pretrain: {i}/3 step"), line


def test_every_recipe_states_its_input_size_and_data_and_recipes_shows_them(capsys):
    from openseer.commands.train import recipe_header
    from openseer.config import build_config, recipe_names

    for name in recipe_names():
        about, cfg = recipe_header(name), build_config(name)
        assert about.get("for") and about.get("input") == f"{cfg.crops.sizes[0]} px", name
    photos = build_config("photos-cpu")
    assert photos.model.stem_stride == 0 and photos.crops.mean == [0.485, 0.456, 0.406]  # photos' own statistics
    assert 96 <= photos.crops.sizes[0] <= 128 and photos.model.arch.startswith("regnet")
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "input" in out.splitlines()[0]
    assert any(re.match(r"photos-cpu +112 px", line) for line in out.splitlines())  # padded to the longest name
    assert re.search(r"photos-cpu +photographs", out) and "seer-gpu" in out


def test_resume_with_a_larger_budget_trains_a_run_that_stopped_on_its_clock(images, tmp_path, capsys):
    """A run that spent its 1.2-second budget; --resume optim.minutes=0.04 trains on until 2.4 s of
    training, and the LR climbs back from the final LR instead of staying there."""
    run = tmp_path / "run"
    assert main(_args(images, run, "optim.epochs=1000", "optim.minutes=0.02", "optim.warmup_steps=1",
                      "swav.freeze_prototypes_steps=1", "checkpoint.every=1000")) == 0
    _, before = latest_checkpoint(run)
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(run)]) == 0
    assert "its time budget of 0.02 minutes is spent" in capsys.readouterr().out
    assert main(["pretrain", "--resume", str(run), "optim.minutes=0.04"]) == 0
    assert f"extending the run at step {before['step']} (optim.minutes 0.02 -> 0.04" in capsys.readouterr().out
    _, after = latest_checkpoint(run)
    assert after["step"] > before["step"] and 2.4 <= after["counters"]["train_seconds"] < 2.4 + 1.2
    assert load_config(run / "config.yaml").optim.minutes == 0.04
    rows = _metrics(run)
    stopped = next(r["lr"] for r in rows if r["step"] == before["step"])
    assert max(r["lr"] for r in rows if r["step"] > before["step"]) > 2 * stopped
