"""bench/fashion_mnist.py in smoke mode: a few seconds of time-budgeted pretraining, then kNN."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import fmnist_available

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.heavy
@fmnist_available
def test_fashion_mnist_bench_spends_its_budget_and_prints_one_json_line(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "fashion_mnist.py"), "--minutes", "0.15", "--out", str(out),
                        "--protocols", "knn", "--limit-train", "1000", "--limit-test", "200", "--threads", "2",
                        "--cache-dir", str(tmp_path / "cache"),
                        "model.compile=false",  # a fresh machine's first compile would outlast the budget
                        "model.head_out=64"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["bench"] == "fashion_mnist" and line["minutes"] == 0.15
    assert 9.0 <= line["train_s"] < 60 and line["steps"] >= 1  # the clock, not a step count, ended the run
    assert "optim.minutes=0.15" in line["overrides"] and line["overrides"][-1] == "model.head_out=64"
    assert "head_out: 64" in (out / "config.yaml").read_text()  # the recipe override reached the run
    assert 10.0 < line["knn20"] <= 100.0  # a real kNN score over 10 classes
    assert line["report"] == str(out / "eval.json") and (out / "eval.json").exists()
    # a second run into the same folder is refused rather than mixed with the first
    again = subprocess.run([sys.executable, str(ROOT / "bench" / "fashion_mnist.py"), "--minutes", "0.1", "--out", str(out)],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert again.returncode == 2 and "already holds a run" in again.stderr
