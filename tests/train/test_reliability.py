"""Never lose a run: SIGKILL at random points (one inside a checkpoint write) and resume bit-exactly;
SIGTERM checkpoints and exits 0; injected NaNs are skipped and logged; disk faults keep the previous
checkpoint; unsafe pickles and read-only outputs are refused. Real processes, real files.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from openseer.data.collection import FASHION_MNIST_DIR
from openseer.train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint
from tests.conftest import EAGER_FP32

pytestmark = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists()
    and not os.environ.get("OPENSEER_FASHION_MNIST"),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)

# 768 images / 64 per step = 12 steps per epoch, 2 epochs = 24 steps, a checkpoint every 3 steps
RUN_ARGS = [
    "--data", "fashion-mnist", "--auto-resume",
    "data.limit=768", "data.batch_size=64", "optim.epochs=2", "optim.warmup_steps=4",
    "checkpoint.every=3", "checkpoint.keep=2", "log.every=1", "log.progress=false", "log.tensorboard=false",
    "swav.queue_length=128", "swav.queue_start_step=2", "swav.freeze_prototypes_steps=4",
    "swav.n_prototypes=50", "model.head_hidden=[128]", "model.head_out=64",
    "threads=1",  # the same thread count in every process (bit-exactness), and no oversubscription
    *EAGER_FP32,
]
TOTAL_STEPS = 24


def _start(run: Path, env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "openseer", "pretrain", "--out", str(run), *RUN_ARGS],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _logged_step(run: Path) -> int:
    try:  # a restart with no checkpoint yet removes the file: it may vanish between two looks
        text = (run / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in text.splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return max(steps)


def _wait(pred, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stdout.read()}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("timed out waiting for the run")


def _final_state(run: Path) -> dict:
    ckpts = list_checkpoints(run)
    state = load_checkpoint(ckpts[-1])
    assert state["step"] == TOTAL_STEPS
    return state


def _assert_same(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"weights differ in {k}"
    assert torch.equal(a["queue"]["embeddings"], b["queue"]["embeddings"])
    assert a["queue"]["filled"] == b["queue"]["filled"]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]), f"momentum differs for {k}"


@pytest.mark.heavy
@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bit_exact(tmp_path):
    ref = tmp_path / "ref"
    p = _start(ref)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    reference = _final_state(ref)

    run = tmp_path / "killed"
    rng = random.Random(1234)
    # kill after these logged steps (randomised), one more kill inside a checkpoint write
    points = sorted(rng.sample(range(1, TOTAL_STEPS - 2), 4))
    plan = [("step", s) for s in points]
    plan.insert(rng.randrange(1, len(plan)), ("in_checkpoint", None))
    kills = 0
    for kind, at in plan:
        if kind == "in_checkpoint":
            proc = _start(run, {"OPENSEER_FAULT_PAUSE_IN_CHECKPOINT": "60"})
            ckdir = run / "checkpoints"
            _wait(lambda d=ckdir: d.is_dir() and any(f.name.endswith(".tmp") for f in d.iterdir()), proc)
        else:
            proc = _start(run)
            _wait(lambda at=at: _logged_step(run) >= at, proc)
            time.sleep(rng.uniform(0, 0.3))  # anywhere inside the following step
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        if kind == "in_checkpoint":
            assert any(p.name.endswith(".tmp") for p in (run / "checkpoints").iterdir())
            for ck in list_checkpoints(run):
                load_checkpoint(ck)  # every complete checkpoint is still intact
    assert kills == 5
    p = _start(run)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    _assert_same(_final_state(run), reference)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, TOTAL_STEPS + 1)), "metrics.jsonl must hold each step once after resumes"


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_zero(tmp_path):
    run = tmp_path / "run"
    proc = _start(run)
    _wait(lambda: _logged_step(run) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM" in out
    assert "(SIGTERM: checkpoint written, resume with --resume)" in out  # the CLI says why it stopped
    last = list_checkpoints(run)[-1]
    step = load_checkpoint(last)["step"]
    assert 2 <= step < TOTAL_STEPS
    assert step == _logged_step(run)  # the checkpoint is at the step boundary where it stopped


@pytest.mark.slow
def test_injected_nan_is_skipped_and_logged(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "openseer", "pretrain", "--out", str(run), *RUN_ARGS, "--max-steps", "5"],
        env={**os.environ, "OPENSEER_FAULT_NAN_STEPS": "2"}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_steps"] == 1
    assert all(r["loss"] == r["loss"] for r in rows if r["step"] != 3)
    diag = json.loads((run / "diagnostics" / "step_00000002_rank0.json").read_text())
    assert diag["step"] == 2 and len(diag["keys"]) == 64 and diag["keys"][0].startswith("fashion-mnist:")


def test_consecutive_nans_stop_with_a_clear_message(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "openseer", "pretrain", "--out", str(run), *RUN_ARGS, "optim.max_bad_steps=2"],
        env={**os.environ, "OPENSEER_FAULT_NAN_STEPS": "0,1,2,3"}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "2 consecutive non-finite steps" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_malicious_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(CheckpointError, match="would run code"):
        load_checkpoint(path)
    assert not marker.exists()


def test_read_only_output_is_refused_before_training(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
            pytest.skip("cannot make a read-only directory as root here (no chattr)")
    else:
        out.chmod(0o555)
    try:
        proc = subprocess.run([sys.executable, "-m", "openseer", "pretrain", "--out", str(out / "run"), *RUN_ARGS],
                              capture_output=True, text=True, timeout=120)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(out)])
        else:
            out.chmod(0o755)
    assert proc.returncode == 2
    assert "cannot write to output directory" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "run").exists()


def test_full_disk_keeps_previous_checkpoint(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        state = {"w": torch.ones(1024 * 1024)}  # 4 MiB: one fits, two do not
        first = save_checkpoint(state, mnt, step=1, keep=1)
        with pytest.raises(CheckpointError, match="intact"):
            save_checkpoint({"w": torch.zeros(1024 * 1024)}, mnt, step=2, keep=1)
        assert list_checkpoints(mnt) == [first]
        assert torch.equal(load_checkpoint(first)["w"], state["w"])
        assert not list((mnt / "checkpoints").glob("*.tmp"))
    finally:
        subprocess.run(["umount", str(mnt)])
