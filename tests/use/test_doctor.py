"""``openseer doctor``: real run directories (a few-step pretrain), then broken copies of them, each
with the one finding that says what is wrong and how to recover."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from openseer.commands import main
from openseer.rundir import CONFIG, METRICS, list_checkpoints
from openseer.train.checkpoint import load_checkpoint, save_checkpoint
from openseer.use.doctor import diagnose
from tests.conftest import FAST, write_pngs


def _pretrain(images: Path, out: Path, *extra: str) -> Path:
    assert main(["pretrain", "--data", str(images), "--out", str(out), *FAST, "data.batch_size=8",
                 "optim.epochs=1", "log.every=1", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("doctor") / "imgs"
    write_pngs(folder, 16, size=(28, 28))
    return folder


@pytest.fixture(scope="module")
def healthy(images, tmp_path_factory) -> Path:
    """A complete 2-step run with a checkpoint at each step."""
    return _pretrain(images, tmp_path_factory.mktemp("doctor") / "run", "checkpoint.every=1", "checkpoint.keep=2")


@pytest.fixture
def copy(healthy, tmp_path) -> Path:
    return Path(shutil.copytree(healthy, tmp_path / "run"))


def _lines(run: Path, level: str | None = None) -> list[str]:
    return [f.what + " | " + f.fix for f in diagnose(run) if level is None or f.level == level]


def test_a_healthy_finished_run(healthy, capsys):
    assert main(["doctor", str(healthy)]) == 0
    out = capsys.readouterr().out
    assert "ERROR" not in out
    assert out.count("WARN") == 1 and "(near ln K = 3.40: collapse?)" in out  # after 2 steps the loss is still there
    assert "config.yaml loads (recipe tiny-cpu, backbone test_resnet)" in out
    assert "step_00000002.pt loads safely (weights_only) at step 2" in out
    assert "step_00000001.pt loads safely" in out
    assert "finished: all 2 steps done" in out
    assert f"resume with: openseer pretrain --resume {healthy}" in out


def test_a_truncated_checkpoint_is_an_error_and_the_previous_one_is_offered(copy, capsys):
    latest = list_checkpoints(copy)[-1]
    latest.write_bytes(latest.read_bytes()[:1000])
    assert main(["doctor", str(copy)]) == 1
    errors = _lines(copy, "error")
    assert len(errors) == 1 and "step_00000002.pt" in errors[0] and "unreadable or truncated" in errors[0]
    assert f"delete {latest}; --resume will use the previous checkpoint" in errors[0]
    assert any("stopped at step 1 of 2: resuming continues it" in x for x in _lines(copy, "ok"))


def test_a_checkpoint_with_non_finite_weights_or_missing_parts(copy):
    state = load_checkpoint(list_checkpoints(copy)[-1])
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name] = torch.full_like(state["model"][name], float("nan"))
    save_checkpoint(state, copy, 2, keep=5)
    assert any(f"non-finite weights in {name}" in x for x in _lines(copy, "error"))
    del state["optimizer"]
    save_checkpoint(state, copy, 2, keep=5)
    assert any("step_00000002.pt lacks optimizer" in x for x in _lines(copy, "error"))


def test_a_missing_config_is_an_error(copy, capsys):
    (copy / CONFIG).unlink()
    assert main(["doctor", str(copy)]) == 1
    errors = _lines(copy, "error")
    assert len(errors) == 1 and errors[0].startswith("config.yaml:") and "restore config.yaml" in errors[0]


def test_no_checkpoint_and_no_metrics(copy):
    shutil.rmtree(copy / "checkpoints")
    (copy / METRICS).unlink()
    assert any("no checkpoint | the run cannot be resumed" in x for x in _lines(copy, "error"))
    assert any(f"no {METRICS} yet" in x for x in _lines(copy, "warn"))
    assert not any("resume with" in x for x in _lines(copy))


def test_leftovers_of_a_crash_are_warnings(copy):
    (copy / "checkpoints" / "step_00000003.pt.tmp").write_bytes(b"half")
    with open(copy / METRICS, "a") as f:
        f.write('{"step": 3, "lo')
    warns = _lines(copy, "warn")
    assert any("step_00000003.pt.tmp: an unfinished checkpoint write" in x and "safe to delete" in x for x in warns)
    assert any("torn line" in x for x in warns)
    assert not _lines(copy, "error")


def test_a_non_finite_loss_and_skipped_steps(copy):
    rows = [json.loads(x) for x in (copy / METRICS).read_text().splitlines()]
    rows[-1]["loss"] = float("nan")
    (copy / METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (copy / "diagnostics").mkdir()
    (copy / "diagnostics" / "step_00000001_rank0.json").write_text("{}")
    assert any("(non-finite)" in x and "optim.base_lr" in x for x in _lines(copy, "error"))
    assert any("1 skipped non-finite steps (diagnostics/)" in x for x in _lines(copy, "warn"))


def test_a_run_that_stopped_on_its_time_budget(images, tmp_path):
    run = _pretrain(images, tmp_path / "budget", "optim.epochs=1000", "optim.minutes=0.0005")
    findings = diagnose(run)
    assert not [f for f in findings if f.level == "error"]
    stopped = [f for f in findings if f.what.startswith("finished: stopped on its time budget")]
    assert len(stopped) == 1 and "0.0005 minutes" in stopped[0].what and "larger optim.minutes" in stopped[0].fix


def test_not_a_directory(tmp_path, capsys):
    assert main(["doctor", str(tmp_path / "nothing")]) == 1
    assert "is not a directory" in capsys.readouterr().out
