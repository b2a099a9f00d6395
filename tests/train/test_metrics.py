"""The run's progress goes through openseer/progress.py: a compile is announced and left out of the
rate; ``log.progress=false`` prints nothing. A log window reads the device once."""

from __future__ import annotations

import time

import torch

from openseer.model.swav import MethodOutput
from openseer.train.metrics import MetricsLog, Window
from openseer.train.step import StepStats
from tests.conftest import tiny_config


def _log(tmp_path, *overrides: str) -> MetricsLog:
    cfg = tiny_config("log.tensorboard=false", *overrides)
    return MetricsLog(tmp_path, cfg, start_step=0, stop_step=10, main=True)


def test_progress_announces_the_compile_and_leaves_it_out_of_the_rate(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENSEER_PROGRESS", "lines")
    log = _log(tmp_path, "log.progress=true")
    with log.compiling():
        time.sleep(0.2)
        log.tick(0.0)  # the compiled first step
    log.tick(0.0)
    assert log.bar.rate() is not None and log.bar.rate() > 10  # one step in ~0 s, not 1 step in 0.2 s
    log.write({"step": 2, "loss": 3.21, "imgs_per_s": 50.0})
    log.close()
    err = capsys.readouterr().err
    assert "pretrain: compiling the model (torch.compile)" in err and "compiled in" in err
    assert "loss=3.21" in err and "2/10 step" in err


def test_no_progress_output_when_off(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENSEER_PROGRESS", "lines")
    log = _log(tmp_path, "log.progress=false")
    with log.compiling():
        log.tick(0.0)
    log.write({"step": 1, "loss": 1.0, "imgs_per_s": 1.0})
    log.close()
    assert capsys.readouterr().err == ""
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


def test_a_window_averages_good_steps_and_keeps_every_loss_for_health():
    w = Window()
    for i, (loss, bad) in enumerate([(2.0, False), (float("nan"), True), (4.0, False)]):
        out = MethodOutput(torch.tensor(loss))
        w.add(StepStats(step=i, lr=0.1, images=8, bad=bad, stop_signalled=False, spent_s=0.0, loss=out.loss,
                        stats={"prototypes_used": torch.tensor(3 + i)}, phases={"forward": 0.5}, output=out), 0.1)
    means, history = w.read()
    assert means["loss"] == 3.0 and means["prototypes_used"] == 4.0 and means["forward_s"] == 0.5
    assert [(s, b) for s, b, _ in history] == [(1, False), (2, True), (3, False)]
