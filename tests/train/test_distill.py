"""Distillation: the student learns the teacher's features, resumes bit for bit, and bad inputs get one message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from openseer.commands import main
from openseer.model.load import load_backbone
from openseer.train.checkpoint import latest_checkpoint, list_checkpoints
from openseer.train.distill import feature_agreement
from openseer.use.api import image_tensor
from tests.conftest import FAST, write_pngs
from tests.use.kit import make_run

# student test_resnet (FAST), 2x24 + 2x12 crops of generated PNGs, batch 32, a high LARC LR
SMALL = [*FAST, "data.batch_size=32", "optim.epochs=4", "optim.base_lr=9.6", "optim.minutes=0", "log.every=1",
         "checkpoint.every=1000"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("distill") / "teacher", arch="test_resnet")


@pytest.fixture(scope="module")
def pile(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pile")
    write_pngs(folder, 64)
    return folder


def _distill(teacher: Path, pile: Path, out: Path, *extra: str) -> int:
    return main(["distill", str(teacher), "--student", "test_resnet", "--data", str(pile), "--out", str(out),
                 *SMALL, *extra])


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_distillation_lowers_the_loss_and_brings_held_out_features_closer(teacher, pile, tmp_path):
    run = tmp_path / "student"
    assert _distill(teacher, pile, run, "--max-steps", "0") == 0  # the untrained student, checkpointed
    held_out = torch.stack([image_tensor(p, 24) for p in write_pngs(tmp_path / "held_out", 80)[64:]])  # unseen seeds
    before = feature_agreement(run, held_out)
    assert main(["distill", "--resume", str(run)]) == 0
    after = feature_agreement(run, held_out)
    rows = _metrics(run)
    assert rows[-1]["step"] == 8
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1  # 1 - cosine, per step
    assert after > before + 0.1, (before, after)
    # a normal run directory: the student loads as a backbone with the training transform
    model, info = load_backbone(str(run))
    assert info["arch"] == "test_resnet" and info["crop_size"] == 24 and info["kind"] == "run"


def test_swav_loss_uses_the_teachers_prototypes_and_learns(teacher, pile, tmp_path):
    run = tmp_path / "swav"
    assert _distill(teacher, pile, run, "distill.loss=swav", "--max-steps", "6") == 0
    rows = _metrics(run)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["cosine_to_teacher"] > rows[0]["cosine_to_teacher"]


def test_a_stopped_distill_run_resumes_bit_exact(teacher, pile, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert _distill(teacher, pile, whole, "--max-steps", "6") == 0
    assert _distill(teacher, pile, parts, "--max-steps", "3") == 0
    assert latest_checkpoint(parts)[1]["step"] == 3
    assert main(["distill", "--resume", str(parts), "--max-steps", "6"]) == 0
    (pa, a), (pb, b) = latest_checkpoint(whole), latest_checkpoint(parts)
    assert a["step"] == b["step"] == 6 and pa.name == pb.name
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    for i, s in a["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])
    assert [r["loss"] for r in _metrics(whole)] == [r["loss"] for r in _metrics(parts)]


@pytest.mark.parametrize("teacher_spec, student, needle", [
    ("no/such/run", "test_resnet", "the teacher: 'no/such/run' is not a run directory, a checkpoint"),
    (None, "no_such_net", "the student (--student): unknown backbone 'no_such_net'"),
])
def test_bad_teacher_or_unknown_student_one_message(teacher, pile, tmp_path, capsys, teacher_spec, student, needle):
    out = tmp_path / "bad"
    code = main(["distill", teacher_spec or str(teacher), "--student", student, "--data", str(pile),
                 "--out", str(out), *SMALL, f"model.arch={student}"])
    err = capsys.readouterr().err
    assert code != 0
    assert needle in err and "Traceback" not in err and err.count("openseer: error:") == 1
    assert not list_checkpoints(out) and not (out / "config.yaml").exists()  # nothing half-made


def test_swav_loss_needs_a_teacher_with_prototypes(pile, tmp_path, capsys):
    code = main(["distill", "test_resnet", "--student", "test_resnet", "--data", str(pile), "--out",
                 str(tmp_path / "x"), *SMALL, "distill.loss=swav"])
    assert code != 0 and "needs a teacher trained by openseer pretrain" in capsys.readouterr().err


def test_export_embed_and_report_take_a_distill_run(teacher, pile, tmp_path):
    run = tmp_path / "student"
    assert _distill(teacher, pile, run, "--max-steps", "2") == 0
    assert main(["export", str(run), "--out", str(tmp_path / "s.onnx")]) == 0
    assert main(["embed", str(run), "--data", str(pile), "--out", str(tmp_path / "emb"), "--quiet"]) == 0
    assert main(["report", str(run), "--sample", "32", "--queries", "2", "--neighbours", "3"]) == 0
    html = (run / "report.html").read_text()
    assert "prototypes receive at least one image" in html  # the student through the teacher's prototypes


def test_distill_runs_in_the_one_loop_and_labels_its_lines_distill(teacher, pile, tmp_path, capsys, monkeypatch):
    """The same loop as pretrain (train/loop.py's ``train``), with the distill method: its progress and
    start lines say distill, its metrics rows carry the loop's columns and the method's own."""
    from openseer.train import loop

    calls = []
    real = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda run, batch: (calls.append(type(run.method).__name__),
                                                                real(run, batch))[1])
    assert _distill(teacher, pile, tmp_path / "s", "--max-steps", "2", "log.progress=true") == 0
    out = capsys.readouterr()
    assert calls == ["DistillMethod", "DistillMethod"]
    text = out.out + out.err
    assert "distill:" in text and "pretrain:" not in text, text
    row = _metrics(tmp_path / "s")[-1]
    assert {"loss", "cosine_to_teacher", "lr", "imgs_per_s", "forward_s", "backward_s", "skipped_steps"} <= set(row)
    assert "collapse_warning" not in row and "prototypes_used" not in row  # SwAV's columns only for SwAV


@pytest.mark.slow
@pytest.mark.heavy  # two torchrun launches: 11 s
def test_torchrun_distills_on_two_gloo_ranks_and_resumes_in_one_process(teacher, pile, tmp_path):
    """Distillation gains torchrun: 2 DDP ranks (gloo) train the student, one process resumes it."""
    from tests.train.test_distributed import _openseer

    run = tmp_path / "student"
    args = [*SMALL, "threads=1", "dist.strategy=ddp"]
    r = _openseer(2, "distill", str(teacher), "--student", "test_resnet", "--data", str(pile), "--out", str(run),
                  "--max-steps", "2", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "world 2, global batch 32 (16/rank)" in r.stdout
    assert latest_checkpoint(run)[1]["step"] == 2 and latest_checkpoint(run)[1]["schedule"]["world_size"] == 2
    r = _openseer(1, "distill", "--resume", str(run), "--max-steps", "4")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = _metrics(run)
    assert [x["step"] for x in rows] == [1, 2, 3, 4] and all(x["loss"] == x["loss"] for x in rows)


def test_a_finished_distill_run_says_so_and_a_larger_epochs_extends_it(teacher, pile, tmp_path, capsys):
    """The same extension as pretrain's, labelled as distill: complete -> the distill command that
    trains it longer; with it, the run goes on to the new length and records it."""
    run = tmp_path / "s"
    assert _distill(teacher, pile, run, "optim.epochs=1") == 0  # 64 images, batch 32: 2 steps
    capsys.readouterr()
    assert main(["distill", "--resume", str(run)]) == 0
    assert f"openseer distill --resume {run} optim.epochs=2" in capsys.readouterr().out
    assert main(["distill", "--resume", str(run), "optim.epochs=3"]) == 0
    assert "extending the run at step 2 (optim.epochs 1 -> 3; 6 steps planned)" in capsys.readouterr().out
    assert [r["step"] for r in _metrics(run)] == list(range(1, 7))
    assert json.loads((run / "schedule.json").read_text())["extended"][0]["to"]["epochs"] == 3
