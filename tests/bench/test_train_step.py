"""bench/train_step.py: its FLOP count for grouped convolutions, and a smoke run of every configuration."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import fmnist_available

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("train_step_bench", ROOT / "bench" / "train_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_grouped_convolution_backward_counts_two_forwards():
    """grad-input + grad-weight of a conv cost one forward each, whatever the groups (by hand: 2*N*Cout*(Cin/g)*k*k*H'*W')."""
    bench = _bench()
    for groups in (1, 8, 64):
        conv = torch.nn.Conv2d(64, 64, 3, padding=1, stride=2, groups=groups)
        x = torch.randn(2, 64, 20, 20, requires_grad=True)
        with FlopCounterMode(display=False, custom_mapping=bench.FLOP_FORMULAS) as counter:
            conv(x).sum().backward()
        forward = 2 * 2 * 64 * (64 // groups) * 9 * 10 * 10
        counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
        assert counts["aten.convolution"] == forward
        assert counts["aten.convolution_backward"] == 2 * forward
        x2 = torch.randn(2, 64, 20, 20)  # no grad-input wanted: the weight gradient only
        with FlopCounterMode(display=False, custom_mapping=bench.FLOP_FORMULAS) as counter:
            conv(x2).sum().backward()
        counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
        assert counts["aten.convolution_backward"] == forward


class _ConvLinear(torch.nn.Module):
    """conv 3x3 -> pool -> linear, applied to each crop: two resolutions, so two shapes per layer."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.fc = torch.nn.Linear(16, 10, bias=False)

    def forward(self, crops):
        return torch.cat([self.fc(self.conv(c).mean((2, 3))) for c in crops])


def test_kernel_ceiling_times_each_layer_alone_with_hand_counted_flops():
    bench = _bench()
    model = _ConvLinear()
    crops = [torch.randn(2, 3, 12, 12), torch.randn(2, 3, 12, 12), torch.randn(2, 3, 6, 6)]
    out = bench.kernel_ceiling(model, crops, None, reps=1)
    kinds = out["by_kind"]
    assert set(kinds) == {"conv other", "linear"}
    assert kinds["conv other"]["calls"] == 3 and kinds["linear"]["calls"] == 3
    # by hand: the conv's input needs no gradient (images), so forward + grad-weight = 2 forwards;
    # the linear's input does (it comes from the conv): forward + grad-input + grad-weight = 3.
    conv = sum(2 * 2 * 16 * 3 * 9 * s * s for s in (12, 12, 6))
    linear = 3 * 2 * 2 * 16 * 10
    assert out["layers_flops"] == 2 * conv + 3 * linear
    assert out["layers_s"] > 0 and out["layers_flops_per_s"] > 0
    assert all(p.grad is None for p in model.parameters())  # the model is left as it was


@pytest.mark.heavy
@fmnist_available
def test_train_step_bench_smoke_prints_one_json_line_per_configuration():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "train_step.py"), "--smoke",
                          "--configs", "tiny,tiny-baseline,rg32,rg128,levers,pretrain", "--big-batch", "1,2", "--ceiling"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    by = {r["config"]: r for r in rows if r.get("config") not in (None, "lever", "pretrain")}
    assert {"tiny", "tiny-baseline", "regnety_002"} <= by.keys()
    for r in by.values():
        assert r["imgs_per_s"] > 0 and r["flops_per_step"] > 0
        assert 0 < r["util_fp32"] and r["peak_bf16_flops"] > 0
    assert set(by["tiny"]["split_s"]) == {"data", "forward", "sinkhorn", "backward", "optimizer"}
    big = [r for r in rows if r.get("arch") == "regnety_002"]  # rg32 and rg128 in smoke mode, batch 1 and 2 each
    assert len(big) == 4 and all(r["device"] == "cpu" and r["compile"] is False for r in big)
    assert sorted(r["batch"] for r in big) == [1, 1, 2, 2]
    assert all(0 < r["imgs_per_s_with_optimizer"] < r["imgs_per_s"] for r in big)
    for r in [*big, by["tiny"]]:  # --ceiling: the layers alone, at most what the step does plus timing noise
        layers = r["layers"]
        assert {"conv 1x1", "conv grouped", "linear"} <= layers["by_kind"].keys()
        assert 0 < layers["share_of_step"] and layers["util_bf16_ceiling"] > 0
        assert layers["layers_flops"] <= r["flops_per_step"]
    assert "cpu_bf16" in by["tiny"]
    levers = [r for r in rows if r.get("config") == "lever"]
    names = " | ".join(r["lever"] for r in levers)
    for part in ("channels_last", "trunk pass", "LARC", "Sinkhorn K=16000"):
        assert part in names
    assert any("speedup_tiny_vs_baseline" in r for r in rows)
    # openseer's real pretrain() on generated shards: images/s and host syncs per non-log step
    (loop,) = [r for r in rows if r.get("config") == "pretrain"]
    assert loop["steps"] == 4 and loop["imgs_per_s"] > 0
    assert loop["host_syncs_per_step_max"] == 1  # the step's verdict, as tests/train/test_step.py states


def test_gpu_script_is_valid_bash_and_runs_the_big_configs_on_cuda():
    script = ROOT / "bench" / "gpu_step.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    # the real loop through a 1-rank process group, with bf16 and compile, printing images/s and syncs
    assert "OPENSEER_PROCESS_GROUP=1" in text and "--configs pretrain" in text and "torch.distributed.run" in text
    assert "optim.precision=bf16" in text and "model.compile=true" in text
    assert "--device cuda" in text and "rg32" in text and "rg128" in text and "--big-compile" in text

