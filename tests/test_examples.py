"""The examples run as a user runs them: examples/swav_minimal.py trains and its loss goes down."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_swav_minimal_runs_and_its_loss_decreases():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "swav_minimal.py"), "--steps", "20"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    losses = [float(x) for x in re.findall(r"^step +\d+ +lr \S+ +loss (\S+)$", done.stdout, re.M)]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    # deterministic (fixed seeds, deterministic algorithms): the last steps sit below the first ones
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses
