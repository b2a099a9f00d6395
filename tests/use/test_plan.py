"""``openseer plan``: exact parameter counts from meta-device models, memory estimates, verdicts, errors."""

from __future__ import annotations

import json

import pytest
import timm

from openseer.commands import main
from openseer.config import build_config
from openseer.model.backbone import build_backbone, count_parameters
from openseer.model.swav import build_swav
from openseer.use.plan import PlanError, activation_bytes, make_plan, parameter_counts

# docs/method.md §2: trunk parameters of the SEER architectures (rounded there; exact here)
SEER_TRUNKS = {"regnety_320": 141e6, "regnety_640": 277e6, "regnety_1280": 637e6, "regnety_2560": 1.27e9,
               "seer_regnet_10b": 9.32e9}


@pytest.mark.parametrize("arch", list(SEER_TRUNKS))
def test_plan_counts_equal_the_instantiated_models(arch):
    cfg = build_config("seer-rg256", [f"model.arch={arch}"])
    counts = parameter_counts(cfg)
    model = timm.create_model(arch, num_classes=0, device="meta")  # the same model, built by timm's registry
    assert counts["trunk"] == count_parameters(model)
    assert counts["trunk"] == pytest.approx(SEER_TRUNKS[arch], rel=0.005)
    width = model.num_features
    assert counts["head"] == (width * 8192 + 8192) + (8192 * 8192 + 8192) + (8192 * 256 + 256)
    assert counts["prototypes"] == 16000 * 256
    assert counts["total"] == counts["trunk"] + counts["head"] + counts["prototypes"]


def test_plan_counts_equal_a_real_small_model():
    cfg = build_config("tiny-cpu")
    real = build_swav(cfg)  # real CPU tensors
    counts = parameter_counts(cfg)
    assert counts["trunk"] == count_parameters(real.backbone) == count_parameters(build_backbone(cfg.model.arch))
    assert counts["head"] == count_parameters(real.head)
    assert counts["prototypes"] == count_parameters(real.prototypes)
    assert counts["total"] == count_parameters(real)


def test_seer_10b_is_built_from_our_config():
    m = build_backbone("seer_regnet_10b", device="meta")
    widths = [getattr(m, f"s{i}").b1.conv3.conv.out_channels for i in range(1, 5)]
    depths = [len(list(getattr(m, f"s{i}").children())) for i in range(1, 5)]
    assert widths == [2020, 4040, 11110, 28280]
    assert depths == [2, 7, 17, 1]
    assert m.s1.b1.conv2.conv.groups == 2020 // 1010  # group width 1010
    assert m.stem.conv.out_channels == 32
    assert count_parameters(m) == 9_323_934_872


def test_activation_estimate_scales_with_batch_and_checkpointing_saves():
    cfg = build_config("seer-rg32")
    a8, a16 = activation_bytes(cfg, 8), activation_bytes(cfg, 16)
    assert a16["plain"] == pytest.approx(2 * a8["plain"], rel=0.02)
    assert a8["checkpointed"] < 0.4 * a8["plain"]
    bf16 = a8["plain"]
    fp32 = activation_bytes(build_config("seer-rg32", ["optim.precision=fp32"]), 8)["plain"]
    assert bf16 == pytest.approx(fp32 / 2, rel=0.1)  # 16-bit compute halves the activations


def test_seer_10b_fits_on_496_a100_40gb_only_with_fsdp_and_checkpointing():
    plan = make_plan(build_config("seer-rg10b"), 496, 40)
    assert plan["batch_per_gpu"] == 16
    assert plan["fits"] == {"DDP": False, "DDP + act. ckpt": False, "FSDP": False, "FSDP + act. ckpt": True}
    ddp = plan["memory"]["DDP"]
    assert ddp["weights"] == 4 * plan["params"]["total"]  # fp32 master weights, replicated
    fsdp = plan["memory"]["FSDP + act. ckpt"]
    assert fsdp["weights"] == 4 * -(-plan["params"]["total"] // 496)  # sharded over 496 ranks


def test_small_recipe_fits_everywhere():
    plan = make_plan(build_config("seer-rg32"), 512, 80)
    assert all(plan["fits"].values())


@pytest.mark.parametrize("gpus, mem, message", [
    (0, 40, "--gpus must be >= 1"),
    (8, 0, "--gpu-mem-gb must be > 0"),
    (500, 40, "not divisible by 500 GPUs"),
])
def test_bad_plans_are_refused(gpus, mem, message):
    with pytest.raises(PlanError, match=message):
        make_plan(build_config("seer-rg10b"), gpus, mem)


def test_cli_plan_reports_and_refuses_what_cannot_fit(capsys):
    assert main(["plan", "--recipe", "seer-rg10b", "--gpus", "496", "--gpu-mem-gb", "40"]) == 0
    out = capsys.readouterr().out
    assert "9,323,934,872" in out and "FSDP + act. ckpt" in out

    assert main(["plan", "--recipe", "seer-rg10b", "--gpus", "64", "--gpu-mem-gb", "40"]) == 2
    captured = capsys.readouterr()
    assert "does not fit on 64 GPUs of 40 GiB" in captured.err
    assert "GPUs of 40 GiB would fit with FSDP + activation checkpointing" in captured.err

    assert main(["plan", "--recipe", "tiny-cpu", "--gpus", "2", "--gpu-mem-gb", "16", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["params"]["trunk"] == count_parameters(build_backbone("regnetx_002", device="meta"))

    assert main(["plan", "--recipe", "tiny-cpu", "--gpus", "3", "--gpu-mem-gb", "16"]) == 2
    assert "not divisible by 3 GPUs" in capsys.readouterr().err

