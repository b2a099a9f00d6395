"""The backbone builder: the stride-1 guard for strided convs on 1x1 inputs (a CPU bf16 kernel bug), the matmul backward of 1x1 convs."""

from __future__ import annotations

import copy

import pytest
import torch

from openseer.model.backbone import (
    NarrowGroupConv2d,
    PointwiseConv2d,
    build_backbone,
    guard_strided_convs_on_1x1_inputs,
    narrow_group_convs_in_fp32,
    pointwise_convs_as_matmul,
)


def _conv(groups: int = 8) -> torch.nn.Conv2d:
    torch.manual_seed(0)
    return torch.nn.Conv2d(64, 64, 3, stride=2, padding=1, groups=groups, bias=False)


def test_guard_gives_the_same_output_and_gradients_on_1x1_inputs():
    plain = _conv()
    guarded = copy.deepcopy(plain)
    assert guard_strided_convs_on_1x1_inputs(guarded) == 1
    x = torch.randn(4, 64, 1, 1)
    for conv in (plain, guarded):
        conv(x).square().sum().backward()
    assert torch.allclose(plain(x), guarded(x), atol=1e-6)
    assert torch.allclose(plain.weight.grad, guarded.weight.grad, atol=1e-6)
    # larger inputs keep the stride
    assert guarded(torch.randn(1, 64, 8, 8)).shape[-2:] == (4, 4)
    assert guarded.stride == (2, 2)


def test_guard_skips_convs_whose_output_would_differ():
    unpadded = torch.nn.Conv2d(8, 8, 3, stride=2, padding=0)
    dilated = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, dilation=2)
    plain = torch.nn.Conv2d(8, 8, 3, stride=1, padding=1)
    assert guard_strided_convs_on_1x1_inputs(torch.nn.Sequential(unpadded, dilated, plain)) == 0


def test_bf16_channels_last_backward_on_small_crops_has_finite_gradients():
    """Without the guard, most of these steps give NaN weight gradients in the last stage (torch 2.14.1)."""
    torch.manual_seed(0)
    model = build_backbone("regnety_002").to(memory_format=torch.channels_last)
    for _ in range(5):
        model.zero_grad(set_to_none=True)
        x = torch.randn(64, 3, 16, 16).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
        norms = torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])
        assert torch.isfinite(norms).all()


def test_stem_stride_changes_only_the_first_convolution():
    default = build_backbone("regnety_002").eval()
    small = build_backbone("regnety_002", stem_stride=1).eval()
    assert small.state_dict().keys() == default.state_dict().keys()
    convs = [m for m in small.modules() if isinstance(m, torch.nn.Conv2d)]
    ref = [m for m in default.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].stride == (1, 1) and ref[0].stride == (2, 2)
    assert [c.stride for c in convs[1:]] == [c.stride for c in ref[1:]]
    with torch.no_grad():  # one more level of resolution kept: 24 px reaches the last stage at 2x2, not 1x1
        maps = small.forward_features(torch.randn(1, 3, 24, 24))
        assert maps.shape[-2:] == (2, 2)
        assert default.forward_features(torch.randn(1, 3, 24, 24)).shape[-2:] == (1, 1)


@pytest.mark.parametrize("shape", [(6, 16, 5, 7), (4, 16, 1, 1)])
def test_pointwise_conv_gradients_equal_the_convolutions(shape):
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(16, 24, 1, bias=False)
    fast = copy.deepcopy(plain)
    assert pointwise_convs_as_matmul(fast) == 1 and isinstance(fast, PointwiseConv2d)
    x = torch.randn(shape).to(memory_format=torch.channels_last)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    g = torch.randn(shape[0], 24, *shape[2:])
    outs = [conv(xi) for conv, xi in zip((plain, fast), xs)]
    for out in outs:
        out.backward(g)
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    assert torch.allclose(xs[0].grad, xs[1].grad, atol=1e-5)
    assert torch.allclose(plain.weight.grad, fast.weight.grad, atol=1e-4)
    assert fast.weight.grad.dtype == torch.float32


def test_pointwise_matmul_picks_only_1x1_stride_1_ungrouped_convs():
    model = build_backbone("regnetx_002")
    before = {n: (m.kernel_size, m.stride, m.groups) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    n = pointwise_convs_as_matmul(model)
    chosen = {name for name, m in model.named_modules() if isinstance(m, PointwiseConv2d)}
    assert n == len(chosen) > 0
    assert chosen == {name for name, (k, s, g) in before.items() if k == (1, 1) and s == (1, 1) and g == 1}
    # NCHW inputs take the convolution itself; channels_last ones the matmul backward: the same function
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model(x), model(x.to(memory_format=torch.channels_last)), rtol=1e-4, atol=1e-5)


def test_narrow_group_convs_run_in_fp32_under_cpu_autocast_only():
    model = build_backbone("regnetx_002")  # 8 channels per group everywhere
    grouped = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1}
    keys = model.state_dict().keys()
    assert narrow_group_convs_in_fp32(model) == len(grouped) == 13
    assert {n for n, m in model.named_modules() if isinstance(m, NarrowGroupConv2d)} == grouped
    assert model.state_dict().keys() == keys
    wide = build_backbone("regnetx_004")  # 16 per group: bf16 is faster there, left alone
    assert narrow_group_convs_in_fp32(wide) == 0
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1, groups=2, bias=False)
    fast = copy.deepcopy(conv)
    assert narrow_group_convs_in_fp32(fast) == 1
    x = torch.randn(2, 16, 6, 6).to(memory_format=torch.channels_last)
    assert torch.equal(fast(x), conv(x))  # no autocast: the convolution itself
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xb = x.bfloat16().requires_grad_()
        out_fast, out_bf16 = fast(xb), conv(xb)
    assert out_bf16.dtype == torch.bfloat16 and out_fast.dtype == torch.float32
    # the fp32 result of the bf16 input: exactly what an fp32 convolution of that input gives
    assert torch.allclose(out_fast, conv(xb.detach().float()), atol=1e-6)
    out_fast.sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and fast.weight.grad.dtype == torch.float32
