"""openseer.progress: plain lines off a terminal (no carriage returns), a bar on one, compiles excluded."""

from __future__ import annotations

import io
import time

import pytest

from openseer.progress import Progress, choose_style, format_seconds, progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_format_seconds_known_values():
    assert format_seconds(4.24) == "4.2s"
    assert format_seconds(75) == "1m15s"
    assert format_seconds(3725) == "1h02m"


def test_a_file_gets_plain_lines_with_rate_and_eta_and_no_carriage_return(monkeypatch):
    monkeypatch.delenv("OPENSEER_PROGRESS", raising=False)
    out = io.StringIO()
    with progress("embed", total=10, unit="img", stream=out, every_s=0) as p:
        for _ in range(10):
            time.sleep(0.002)
            p.update()
            p.postfix(loss=1.5)
    text = out.getvalue()
    assert "\r" not in text
    lines = text.strip().splitlines()
    assert len(lines) == 11  # one line per update (every_s=0) and the closing line
    assert lines[0].startswith("embed: 1/10 img (10%)")
    assert "img/s" in lines[4] and "ETA" in lines[4] and "loss=1.5" in lines[4]
    assert lines[-1].startswith("embed: 10/10 img (100%)") and "done in" in lines[-1]


def test_a_clock_bar_shows_no_seconds_per_second(monkeypatch):
    # a time-budgeted pretraining counts seconds: its rate is always about 1 s/s, so the line leaves it
    # out and shows the ETA and the step's own numbers (images/s) instead
    monkeypatch.delenv("OPENSEER_PROGRESS", raising=False)
    out = io.StringIO()
    with progress("pretrain", total=300, unit="s", stream=out, every_s=0) as p:
        time.sleep(0.01)
        p.postfix(img_s=350)
        p.update(10)
    line = out.getvalue().splitlines()[0]
    assert line.startswith("pretrain: 10/300 s (3%), ETA ") and line.endswith("img_s=350")
    assert "s/s" not in out.getvalue()


def test_lines_are_rate_limited(monkeypatch):
    monkeypatch.delenv("OPENSEER_PROGRESS", raising=False)
    out = io.StringIO()
    p = Progress("shard", total=1000, stream=out, every_s=3600)
    for _ in range(1000):
        p.update()
    assert out.getvalue() == ""  # nothing before the interval passes
    p.close()
    assert out.getvalue().count("\n") == 1


def test_a_terminal_gets_a_bar_and_off_prints_nothing(monkeypatch):
    monkeypatch.delenv("OPENSEER_PROGRESS", raising=False)
    tty = _Tty()
    assert choose_style(tty) == "bar"
    with progress("pretrain", total=3, stream=tty) as p:
        p.update(3)
    assert "\r" in tty.getvalue()
    quiet = io.StringIO()
    with progress("pretrain", total=3, stream=quiet, enabled=False) as p:
        p.update(3)
        p.write("hello")
    assert quiet.getvalue() == ""


def test_environment_forces_a_style(monkeypatch):
    monkeypatch.setenv("OPENSEER_PROGRESS", "lines")
    assert choose_style(_Tty()) == "lines"
    monkeypatch.setenv("OPENSEER_PROGRESS", "fancy")
    with pytest.raises(ValueError, match="OPENSEER_PROGRESS"):
        choose_style(io.StringIO())


def test_compile_time_is_announced_and_left_out_of_the_rate(monkeypatch):
    monkeypatch.delenv("OPENSEER_PROGRESS", raising=False)
    out = io.StringIO()
    p = Progress("pretrain", total=100, unit="step", stream=out, every_s=3600)
    with p.compiling():
        time.sleep(0.3)  # a slow first step
        p.update()
    for _ in range(9):
        time.sleep(0.001)
        p.update()
    rate = p.rate()
    assert rate is not None and rate > 100  # about 9 steps in ~10 ms, not 10 steps in 0.3 s
    assert p.eta_s() < 5
    text = out.getvalue()
    assert "compiling the model" in text and "compiled in" in text
    p.close()
    assert "of which compiling" in out.getvalue()
