"""The run directory's one owner (openseer/rundir.py): names, checkpoint listing, start/resume checks,
and the small readers and writers of its files."""

from __future__ import annotations

import json

import pytest

from openseer import rundir
from openseer.config import save_config
from openseer.rundir import RunError
from tests.conftest import tiny_config


def test_checkpoints_are_listed_oldest_first_by_step_and_temporaries_are_not(tmp_path):
    folder = tmp_path / rundir.CKPT_DIR
    folder.mkdir()
    for name in ("step_00000010.pt", "step_00000002.pt", "step_00000003.pt.tmp", "notes.txt"):
        (folder / name).write_bytes(b"x")
    (folder / "step_00000005.dcp").mkdir()  # a sharded checkpoint without its meta.pt: incomplete
    (folder / "step_00000007.dcp").mkdir()
    (folder / "step_00000007.dcp" / rundir.META).write_bytes(b"x")
    assert [p.name for p in rundir.list_checkpoints(tmp_path)] == ["step_00000002.pt", "step_00000007.dcp",
                                                                   "step_00000010.pt"]
    assert [rundir.checkpoint_step(p) for p in rundir.list_checkpoints(tmp_path)] == [2, 7, 10]
    assert rundir.checkpoint_path(tmp_path, 12) == folder / "step_00000012.pt"
    assert [p.name for p in rundir.leftover_temporaries(tmp_path)] == ["step_00000003.pt.tmp"]
    with pytest.raises(ValueError, match="not named like a checkpoint"):
        rundir.checkpoint_step(folder / "notes.txt")


def test_a_new_run_writes_its_config_and_an_existing_one_is_refused(tmp_path):
    cfg = tiny_config()
    run = tmp_path / "run"
    assert rundir.prepare_run_dir(run, cfg, False, main=True, write=False) is False
    assert not run.exists()  # only checked
    assert rundir.prepare_run_dir(run, cfg, False, main=True) is False
    assert rundir.is_run(run) and rundir.load_run_config(run).model.arch == cfg.model.arch
    with pytest.raises(RunError, match="already holds a run"):
        rundir.prepare_run_dir(run, cfg, False, main=True)
    with pytest.raises(RunError, match="is not a run directory"):
        rundir.prepare_run_dir(tmp_path / "none", cfg, True, main=True)


def test_auto_resume_refuses_another_config_and_names_the_first_difference(tmp_path):
    run = tmp_path / "run"
    save_config(tiny_config(), (run.mkdir() or run) / rundir.CONFIG)
    other = tiny_config("seed=7")
    assert rundir.config_diff(rundir.load_run_config(run), other) == "seed: 0 vs 7"
    with pytest.raises(RunError, match=r"different config \(seed: 0 vs 7\)"):
        rundir.prepare_run_dir(run, other, "auto", main=True)
    assert rundir.config_diff(tiny_config(), tiny_config("log.every=3", "threads=2")) == ""  # resumable keys


def test_metrics_bad_images_schedule_and_diagnostics_round_trip(tmp_path):
    (tmp_path / rundir.METRICS).write_text('{"step": 1, "loss": 2.0}\n{"note": 1}\n{"step": 2, "loss": 1.5}\n{"st')
    assert [r["step"] for r in rundir.read_metrics(tmp_path)] == [1, 2]
    rundir.truncate_metrics(tmp_path, 1)
    assert [r["step"] for r in rundir.read_metrics(tmp_path)] == [1]
    rundir.append_bad_images(tmp_path, [("a.jpg", "truncated"), ("b.png", "too-large")])
    assert rundir.read_bad_images(tmp_path) == [("truncated", "a.jpg"), ("too-large", "b.png")]
    rundir.write_schedule(tmp_path, {"total_steps": 4})
    assert rundir.read_json(tmp_path, rundir.SCHEDULE) == {"total_steps": 4}
    assert rundir.read_json(tmp_path, rundir.EVAL) is None
    (tmp_path / rundir.EVAL).write_text("{")
    with pytest.raises(json.JSONDecodeError):
        rundir.read_json(tmp_path, rundir.EVAL)
    assert rundir.diagnostic_path(tmp_path, 3, 1) == tmp_path / "diagnostics" / "step_00000003_rank1.json"


def test_a_resume_may_make_a_run_longer_never_shorter(tmp_path):
    """optim.epochs and optim.minutes may grow on resume (the loop re-plans the schedule), and only grow;
    config_diff ignores them; the new length is written back atomically."""
    from openseer.config import ConfigError

    run = tmp_path / "run"
    save_config(tiny_config("optim.epochs=2", "optim.minutes=5"), (run.mkdir() or run) / rundir.CONFIG)
    (run / rundir.CKPT_DIR).mkdir()
    (run / rundir.CKPT_DIR / "step_00000004.pt").write_bytes(b"x")
    longer = rundir.resume_config(run, ["optim.epochs=4", "optim.minutes=0"])  # 0: no budget, the longest
    assert (longer.optim.epochs, longer.optim.minutes) == (4, 0)
    assert rundir.config_diff(rundir.load_run_config(run), longer) == ""
    for shorter in ("optim.epochs=1", "optim.minutes=2"):
        with pytest.raises(ConfigError, match="extend a run, not shorten it"):
            rundir.resume_config(run, [shorter])
    with pytest.raises(ConfigError, match="to train longer: optim.epochs or optim.minutes"):
        rundir.resume_config(run, ["optim.base_lr=1.0"])
    rundir.rewrite_config(run, longer)
    assert rundir.load_run_config(run).optim.epochs == 4
    assert sorted(p.name for p in run.iterdir()) == [rundir.CKPT_DIR, rundir.CONFIG]  # no temporary left


def test_resume_of_a_run_without_a_checkpoint_says_how_to_start_again(tmp_path):
    run = tmp_path / "run"
    save_config(tiny_config(), (run.mkdir() or run) / rundir.CONFIG)
    with pytest.raises(RunError, match="no checkpoint to resume from .* remove .* start the run again with --out"):
        rundir.prepare_run_dir(run, tiny_config(), True, main=True, write=False)
