"""The command line: bad input gives exit code 2 and one clear line on stderr, never a traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from openseer.commands import main
from openseer.config import recipe_names
from tests.conftest import FAST, snapshot, write_pngs


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli") / "imgs"
    write_pngs(folder, 16, size=(28, 28))
    return folder


def _args(images: Path, *extra: str) -> list[str]:
    return ["--data", str(images), *FAST, "data.batch_size=8", "optim.epochs=1", *extra]


@pytest.fixture(scope="module")
def finished_run(images, tmp_path_factory) -> Path:
    """A real, complete run (2 steps) to resume, refuse and compare against."""
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["pretrain", *_args(images), "--out", str(run)]) == 0
    return run


def _fails(capsys, argv: list[str], *fragments: str) -> str:
    code = main(argv)
    out = capsys.readouterr()
    assert code == 2, out
    err = out.err.strip()
    assert len(err.splitlines()) == 1, err  # one line ...
    assert err.startswith("openseer: error: ")  # ... that says it is an error ...
    assert "Traceback" not in out.err + out.out
    for fragment in fragments:  # ... and what is wrong
        assert fragment in err, (fragment, err)
    return err


def test_recipes_lists_every_recipe(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in recipe_names():
        assert name in out
    assert "regnety_640" in out and "16000" in out


def test_missing_data_path(capsys, tmp_path):
    out = tmp_path / "run"
    _fails(capsys, ["pretrain", "--data", str(tmp_path / "nowhere"), "--out", str(out), *FAST],
           "nowhere", "does not exist")
    assert not (out / "config.yaml").exists()  # nothing half-made: the same --out works once fixed


def test_empty_data_folder(capsys, tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images here")
    out = tmp_path / "run"
    _fails(capsys, ["pretrain", "--data", str(empty), "--out", str(out), *FAST], "no images found", str(empty))
    assert not (out / "config.yaml").exists()


def test_too_few_images_for_a_batch(capsys, images, tmp_path):
    """A pile smaller than one batch trains with the batch it fills (said, and recorded in config.yaml);
    one image cannot make a SwAV batch: refused, and nothing is left behind."""
    run = tmp_path / "r"
    assert main(["pretrain", *_args(images, "data.batch_size=64"), "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "the pile has 16 images, fewer than data.batch_size=64: training with a global batch of 16" in out
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["batch_size"] == 16
    one = tmp_path / "one"
    write_pngs(one, 1, size=(28, 28))
    _fails(capsys, ["pretrain", *_args(one, "data.batch_size=64"), "--out", str(tmp_path / "r1")],
           "1 usable image", "add images")
    assert not (tmp_path / "r1").exists()


def test_missing_fashion_mnist(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENSEER_FASHION_MNIST", str(tmp_path / "fm"))
    _fails(capsys, ["pretrain", "--data", "fashion-mnist", "--out", str(tmp_path / "r"), *FAST],
           "Fashion-MNIST", "apt-get install", str(tmp_path / "fm"))


def test_unknown_recipe(capsys, images, tmp_path):
    err = _fails(capsys, ["pretrain", "--recipe", "seer-rg999", "--data", str(images), "--out", str(tmp_path / "r")],
                 "seer-rg999")
    assert "tiny-cpu" in err  # lists the ones that exist


def test_unknown_backbone(capsys, images, tmp_path):
    out = tmp_path / "r"
    _fails(capsys, ["pretrain", *_args(images, "model.arch=regnety_9999"), "--out", str(out)], "regnety_9999")
    assert not (out / "config.yaml").exists()


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("optim.lr=0.1", ["optim.lr", "base_lr"]),  # unknown key: names it and the allowed ones
        ("data.batch_size=many", ["data.batch_size", "integer"]),  # wrong type
        ("log.progress=perhaps", ["log.progress"]),
        ("batch_size", ["batch_size", "key=value"]),  # no '='
    ],
)
def test_bad_override(capsys, images, tmp_path, override, fragments):
    _fails(capsys, ["pretrain", *_args(images), "--out", str(tmp_path / "r"), override], *fragments)
    assert not (tmp_path / "r").exists()


def test_missing_out(capsys, images):
    _fails(capsys, ["pretrain", *_args(images)], "--out")


def test_resume_on_a_directory_without_a_run(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(capsys, ["pretrain", "--resume", str(empty)], str(empty))
    _fails(capsys, ["pretrain", "--resume", str(tmp_path / "absent")], "absent")


def test_resume_on_a_run_without_checkpoint(capsys, finished_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(finished_run / "config.yaml", run / "config.yaml")
    _fails(capsys, ["pretrain", "--resume", str(run)], "no checkpoint", str(run))


def test_resume_with_an_incompatible_checkpoint(capsys, finished_run, tmp_path):
    """The run's config was changed by hand (another head width): its checkpoint no longer fits."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw["model"]["head_out"] = 48
    (run / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    before = snapshot(run / "checkpoints")
    _fails(capsys, ["pretrain", "--resume", str(run)], "model.head_out")
    assert snapshot(run / "checkpoints") == before


def test_resume_refuses_overrides_that_change_the_run(capsys, finished_run):
    before = snapshot(finished_run)
    _fails(capsys, ["pretrain", "--resume", str(finished_run), "model.arch=resnet18"], "model.arch")
    _fails(capsys, ["pretrain", "--resume", str(finished_run), "--data", "elsewhere"], "--resume")
    assert snapshot(finished_run) == before


def test_out_that_already_holds_a_run_is_left_untouched(capsys, images, finished_run):
    before = snapshot(finished_run)
    assert before  # config.yaml, metrics.jsonl, checkpoints ...
    _fails(capsys, ["pretrain", *_args(images), "--out", str(finished_run)], "already holds a run", "--resume")
    _fails(capsys, ["pretrain", *_args(images, "optim.base_lr=1.0"), "--out", str(finished_run)],
           "already holds a run")
    assert snapshot(finished_run) == before


def test_a_finished_run_prints_where_it_is(capsys, images, tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", *_args(images), "--out", str(run), "--max-steps", "1"]) == 0
    out = capsys.readouterr()
    assert "stopped at step 1/2" in out.out and str(run) in out.out
    assert out.err.strip() == ""


def test_overrides_may_stand_anywhere(capsys, images, tmp_path):
    run = tmp_path / "run"
    argv = ["pretrain", "--data", str(images), *FAST, "optim.base_lr=0.5", "--out", str(run), "data.batch_size=4",
            "--max-steps", "1", "seed=3"]
    assert main(argv) == 0
    raw = yaml.safe_load((run / "config.yaml").read_text())
    assert raw["optim"]["base_lr"] == 0.5 and raw["data"]["batch_size"] == 4 and raw["seed"] == 3
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # a stray option is still argparse's usage error
        main(["pretrain", "--data", str(images), "--out", str(tmp_path / "r2"), "--no-such-flag"])
    assert e.value.code == 2


def test_sigterm_to_a_running_pretrain_says_a_checkpoint_was_written(images, tmp_path):
    """SIGTERM: the loop checkpoints at the next step boundary, the CLI says why it stopped, exit 0."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    argv = [sys.executable, "-m", "openseer", "pretrain", *_args(images, "optim.epochs=10000", "log.every=1",
                                                               "log.progress=false", "checkpoint.every=100000"),
            "--out", str(run)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 240
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "openseer: SIGTERM received: checkpointing at step" in out
    assert "(SIGTERM: checkpoint written, resume with --resume)" in out, out
    step = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert f"stopped at step {step}/" in out
    assert (run / "checkpoints" / f"step_{step:08d}.pt").is_file()


def test_a_folder_of_only_corrupt_images_at_a_small_batch_with_loader_workers(capsys, tmp_path):
    """Found by the loader workers, not before: still one line, exit 2, and no run directory left."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(6):
        (bad / f"img{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(i, i + 200)))  # a PNG signature, no image
    out = tmp_path / "run"
    _fails(capsys, ["pretrain", "--data", str(bad), "--out", str(out), *FAST, "data.batch_size=2",
                    "data.num_workers=2"], "no usable image in", str(bad), "all 6 files are unreadable")
    assert not out.exists()  # the same command works once the folder is fixed
