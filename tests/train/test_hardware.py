"""``auto`` precision and compile: resolved from what the machine has, recorded, and run for real."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from openseer.config import ConfigError, build_config
from openseer.train import hardware
from openseer.train.hardware import resolve_auto
from openseer.train.loop import pretrain
from tests.conftest import fmnist_available, tiny_config

CPU = torch.device("cpu")


def _cpu(monkeypatch, bf16: bool, amx: bool, cxx: str | None) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(hardware.shutil, "which", lambda name: cxx)


@pytest.mark.parametrize("bf16, amx, cxx, precision, compiled", [
    (True, False, "/usr/bin/g++", "bf16", True),
    (False, True, "/usr/bin/g++", "bf16", True),
    (False, False, "/usr/bin/g++", "fp32", True),  # emulated bf16 is slower than fp32
    (True, False, None, "bf16", False),  # no compiler: inductor cannot build CPU kernels
])
def test_auto_follows_the_cpu(monkeypatch, bf16, amx, cxx, precision, compiled):
    _cpu(monkeypatch, bf16, amx, cxx)
    cfg = tiny_config("optim.precision=auto", "model.compile=auto")
    out, notes = resolve_auto(cfg, CPU)
    assert (out.optim.precision, out.model.compile) == (precision, compiled)
    assert (cfg.optim.precision, cfg.model.compile) == ("auto", "auto")  # the caller's config is untouched
    assert notes[0].startswith(f"optim.precision=auto -> {precision} (")
    assert notes[1].startswith(f"model.compile=auto -> {str(compiled).lower()} (")
    assert ("no C++ compiler" in notes[1]) == (cxx is None)


def test_explicit_settings_are_kept(monkeypatch):
    _cpu(monkeypatch, False, False, None)
    cfg = tiny_config("optim.precision=bf16", "model.compile=true")
    out, notes = resolve_auto(cfg, CPU)
    assert out is cfg and notes == []


def test_the_tiny_recipe_says_auto_and_bad_values_are_refused():
    cfg = build_config("tiny-cpu", [])
    assert (cfg.optim.precision, cfg.model.compile) == ("auto", "auto")
    with pytest.raises(ConfigError, match="model.compile must be true, false or auto"):
        build_config("tiny-cpu", ["model.compile=fast"])
    with pytest.raises(ConfigError, match="optim.precision must be one of"):
        build_config("tiny-cpu", ["optim.precision=bf17"])


@pytest.mark.heavy
@fmnist_available
def test_a_run_records_what_auto_chose(tmp_path, capsys):
    """A few real steps with the recipe's auto settings on this machine (timm's test ResNet: its
    first compile on a fresh machine takes seconds where regnetx_002's takes a minute and a half)."""
    cfg = tiny_config("data.source=fashion-mnist", "data.limit=256", "data.batch_size=32",
                      "optim.precision=auto", "model.compile=auto", "optim.epochs=1")
    expected, notes = resolve_auto(cfg, CPU)
    summary = pretrain(cfg, tmp_path / "run", max_steps=3)
    assert summary["step"] == 3 and summary["counters"]["skipped_steps"] == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["optim"]["precision"] == expected.optim.precision
    assert saved["model"]["compile"] == expected.model.compile
    log = capsys.readouterr()
    for note in notes:
        assert note in log.out + log.err
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
