"""``make demo`` on a small subset: its own commands, a plain log when piped, and the summary it ends with.

The Makefile's demo target runs pretrain -> eval -> report; DEMO_* variables shrink it here (a few
steps in fp32 eager, 500 train / 200 test images, a 64-image report sample) without changing which
commands run or which protocols and baselines the evaluation prints.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import fmnist_available

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.heavy  # the whole `make demo` path in small: 30 s (.ci/run runs it; `make demo` is timed itself)
@fmnist_available
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_demo_prints_a_summary_and_no_carriage_returns(tmp_path):
    venv = Path(sys.executable).parent.parent  # the venv running the tests is the one the demo uses
    if not (venv / "bin" / "openseer").is_file():
        pytest.skip(f"no {venv / 'bin' / 'openseer'}: the tests do not run from the project's venv")
    run = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENSEER_PROGRESS")}
    env.update(OPENSEER_PROGRESS_EVERY="1", PYTHONPATH=str(ROOT))
    cmd = ["make", "-s", "-o", str(venv / ".openseer-installed"), "demo", f"VENV={venv}", f"DEMO={run}",
           "DEMO_MINUTES=0.5",
           "DEMO_PRETRAIN=--max-steps 3 data.batch_size=32 data.limit=512 optim.precision=fp32 "
           "log.tensorboard=false",
           f"DEMO_EVAL_ARGS=--limit-train 500 --limit-test 200 --cache-dir {tmp_path / 'cache'}",
           "DEMO_REPORT_ARGS=--sample 64"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log
    assert "\r" not in log, "a carriage-return frame reached a file: " + repr(log[max(0, log.find("\r") - 200):][:400])
    summary = r.stdout[r.stdout.index("== openseer: summary =="):]
    assert f"run:    {run}/" in summary
    assert "trained: 3 steps" in summary
    table = [line for line in summary.splitlines() if line.startswith("| ")]
    assert table[0] == "| protocol | labels | this model | random init* | raw pixels |"
    assert [line.split(" | ")[:2] for line in table[1:]] == [
        ["| kNN k=20", "100%"], ["| linear probe", "100%"], ["| linear probe", "1/class"], ["| linear probe", "10%"],
        ["| finetune's choice", "100 chosen by select"], ["| finetune's choice", "100 random"]]
    assert all(len(line.split("|")) == 7 and all("." in c for c in line.split("|")[3:6]) for line in table[1:5])
    # the few-label rows: 100 labels chosen by select against 100 random (mean ± spread over draws), the
    # model's features and raw pixels'
    select, random = (line.split("|")[3:6] for line in table[5:])
    assert "." in select[0] and "±" not in select[0] and not select[1].strip() and not select[2].strip()
    assert "±" in random[0] and not random[1].strip() and "±" in random[2]
    assert "pretrained model above random init and raw pixels on " in summary and " of 5 rows" in summary
    doc = json.loads((run / "eval.json").read_text())
    few = {r["model"] + " " + r["split"]: r for r in doc["results"] if r["protocol"] == "fewlabels"}
    assert sorted(few) == ["pixels random100", "this random100", "this select100"]
    assert few["this random100"]["draws"] == 3 and len(few["this random100"]["top1_draws"]) == 3
    assert few["this select100"]["n_train"] == 100 and few["this select100"]["protocol_chosen"]
    assert summary.rstrip().endswith(f"report: {run / 'report.html'}") and (run / "report.html").is_file()
    assert (run / "eval.json").is_file() and (run / "eval.md").is_file()
    # progress came as plain lines (what, how far, rate) and the CUDA loader warning never showed
    assert "model train: 500/500 img (100%)" in log
    assert "No CUDA runtime" not in log
