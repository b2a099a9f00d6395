"""LARC (docs/method.md §4) against a hand computation, and the warmup + cosine LR schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from openseer.train.optim import LARC, build_optimizer, lr_at, peak_lr
from tests.conftest import tiny_config

LR, MOMENTUM, WD, TRUST = 0.8, 0.9, 1e-4, 0.001


def _params():
    g = torch.Generator().manual_seed(0)
    w1 = torch.nn.Parameter(torch.randn(4, 3, generator=g))
    w2 = torch.nn.Parameter(torch.randn(5, generator=g) * 0.1)
    frozen = torch.nn.Parameter(torch.randn(2, 2, generator=g))
    return w1, w2, frozen


def _grads(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(4, 3, generator=g) * 0.5, torch.randn(5, generator=g) * 3.0


def _hand_larc(ws: list[np.ndarray], grads_per_step: list[list[np.ndarray]]) -> list[np.ndarray]:
    """lr_p = lr * trust * ||w|| / (||g|| + wd ||w||), applied to (g + wd w), then SGD momentum."""
    ws = [w.astype(np.float64).copy() for w in ws]
    bufs: list[np.ndarray | None] = [None] * len(ws)
    for grads in grads_per_step:
        for i, (w, g) in enumerate(zip(ws, grads)):
            g = g.astype(np.float64)
            wn, gn = np.sqrt((w ** 2).sum()), np.sqrt((g ** 2).sum())
            local = TRUST * wn / (gn + WD * wn)
            d = (g + WD * w) * local
            bufs[i] = d if bufs[i] is None else MOMENTUM * bufs[i] + d
            ws[i] = w - LR * bufs[i]
    return ws


def test_larc_step_matches_the_formula_by_hand():
    w1, w2, frozen = _params()
    start = [w1.detach().numpy().copy(), w2.detach().numpy().copy()]
    frozen_before = frozen.detach().clone()
    sgd = torch.optim.SGD([w1, w2, frozen], lr=LR, momentum=MOMENTUM, weight_decay=WD)
    opt = LARC(sgd, trust_coefficient=TRUST, clip=False)
    all_grads = []
    for step in range(3):  # three steps: the momentum buffer matters from the second on
        g1, g2 = _grads(step)
        all_grads.append([g1.numpy(), g2.numpy()])
        w1.grad, w2.grad, frozen.grad = g1.clone(), g2.clone(), None
        opt.step()
        expected = _hand_larc(start, all_grads)
        assert np.allclose(w1.detach().numpy(), expected[0], rtol=1e-5, atol=1e-7)
        assert np.allclose(w2.detach().numpy(), expected[1], rtol=1e-5, atol=1e-7)
        # the parameter without a gradient is untouched: same bits, no momentum, no decay
        assert torch.equal(frozen.detach(), frozen_before)
        assert "momentum_buffer" not in sgd.state.get(frozen, {})
    # LARC owns the weight decay: the wrapped SGD never applies its own
    assert sgd.param_groups[0]["weight_decay"] == 0.0 and sgd.param_groups[0]["larc_weight_decay"] == WD


def test_larc_really_scales_each_parameter_differently():
    """Without LARC both parameters would move by lr * g; with it, by about lr * trust * ||w|| / ||g|| * g."""
    w1, w2, _ = _params()
    before = [w1.detach().clone(), w2.detach().clone()]
    opt = LARC(torch.optim.SGD([w1, w2], lr=1.0, momentum=0.0, weight_decay=0.0), trust_coefficient=0.01)
    g1, g2 = _grads(0)
    w1.grad, w2.grad = g1.clone(), g2.clone()
    opt.step()
    for w, b, g in zip((w1, w2), before, (g1, g2)):
        step = b - w.detach()
        assert float(step.norm()) == pytest.approx(0.01 * float(b.norm()), rel=1e-5)  # relative step = trust * lr
        assert float(torch.cosine_similarity(step.flatten(), g.flatten(), dim=0)) == pytest.approx(1.0, abs=1e-6)


def test_larc_clip_mode_never_exceeds_the_global_lr():
    w = torch.nn.Parameter(torch.ones(3))
    opt = LARC(torch.optim.SGD([w], lr=0.1, momentum=0.0), trust_coefficient=1000.0, clip=True)
    w.grad = torch.full((3,), 1e-3)
    opt.step()
    assert torch.allclose(w.detach(), torch.ones(3) - 0.1 * 1e-3)  # local/lr clipped at 1: plain SGD


def test_larc_zero_weight_or_grad_falls_back_to_plain_sgd():
    w = torch.nn.Parameter(torch.zeros(3))
    opt = LARC(torch.optim.SGD([w], lr=0.5, momentum=0.0), trust_coefficient=0.001)
    w.grad = torch.ones(3)
    opt.step()
    assert torch.allclose(w.detach(), torch.full((3,), -0.5))


def test_grads_finite():
    w = torch.nn.Parameter(torch.ones(2))
    opt = LARC(torch.optim.SGD([w], lr=0.1))
    assert opt.grads_finite()  # no grads at all
    w.grad = torch.tensor([1.0, float("nan")])
    assert not opt.grads_finite()
    w.grad = torch.tensor([1.0, 2.0])
    assert opt.grads_finite()


def test_an_older_optimizer_state_gives_its_weight_decay_to_larc():
    """States saved before LARC owned the weight decay (SGD's own key) load without decaying twice."""
    w = torch.nn.Parameter(torch.ones(3))
    old = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=1e-5)  # how it used to be built
    w.grad = torch.ones(3)
    old.step()
    state = old.state_dict()
    opt = LARC(torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1, momentum=0.9))
    opt.load_state_dict(state)
    group = opt.param_groups[0]
    assert group["weight_decay"] == 0.0 and group["larc_weight_decay"] == 1e-5


def test_gradient_norms_are_computed_once_for_the_check_and_the_step(monkeypatch):
    from openseer.train import optim

    ws = [torch.nn.Parameter(torch.randn(4)) for _ in range(3)]
    opt = LARC(torch.optim.SGD(ws, lr=0.1, momentum=0.9, weight_decay=1e-4))
    reference = LARC(torch.optim.SGD([torch.nn.Parameter(w.detach().clone()) for w in ws], lr=0.1, momentum=0.9,
                                     weight_decay=1e-4))
    for w, r in zip(ws, reference.param_groups[0]["params"]):
        w.grad = torch.randn(4)
        r.grad = w.grad.clone()
    calls = []
    real = optim.whole_norms
    monkeypatch.setattr(optim, "whole_norms", lambda ts: calls.append(len(ts)) or real(ts))
    finite = opt.check_grads()
    assert finite.dtype == torch.bool and bool(finite)
    opt.step()
    assert calls == [3, 3]  # gradient norms once (check), weight norms once (step): not the gradients again
    reference.step()  # without a check first: computes them itself, the same bits
    for w, r in zip(ws, reference.param_groups[0]["params"]):
        assert torch.equal(w, r)


def test_build_optimizer_uses_the_config():
    cfg = tiny_config("optim.momentum=0.8", "optim.weight_decay=1e-5", "optim.lars_trust=0.002")
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, LARC)
    group = opt.param_groups[0]
    assert group["momentum"] == 0.8 and group["larc_weight_decay"] == 1e-5
    assert group["weight_decay"] == 0.0  # SGD is built without weight decay: LARC applies it
    assert opt.trust_coefficient == 0.002 and opt.clip is False
    assert len(group["params"]) == 2  # weight decay on all parameters, biases included


# ---------------------------------------------------------------- schedule


def test_peak_lr_scales_linearly_with_batch():
    assert peak_lr(0.3, 256) == pytest.approx(0.3)
    assert peak_lr(0.3, 8192) == pytest.approx(9.6)  # docs/method.md §4


@pytest.mark.parametrize(("total", "warmup", "start_ratio"), [(100, 10, 0.0), (1000, 80, 0.015625), (50, 0, 0.5),
                                                                (12, 6, 0.1)])
def test_lr_schedule_endpoints_and_monotone_parts(total, warmup, start_ratio):
    peak, final_ratio = 9.6, 0.001
    lrs = [lr_at(s, total, peak, warmup, start_ratio, final_ratio) for s in range(total)]
    if warmup:
        assert lrs[0] == pytest.approx(start_ratio * peak)
        assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup + 1]))  # strictly up during warmup
        assert lrs[warmup - 1] < peak
    assert lrs[warmup] == pytest.approx(peak)  # the peak at the end of warmup
    assert max(lrs) == pytest.approx(peak)
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # never up after warmup
    assert lrs[-1] == pytest.approx(final_ratio * peak)  # the last step runs at the final LR
    assert min(lrs[warmup:]) >= final_ratio * peak * (1 - 1e-9)
    # a cosine: half-way through the decay the LR is half-way between peak and final
    if total - 1 - warmup >= 2 and (total - 1 - warmup) % 2 == 0:
        mid = warmup + (total - 1 - warmup) // 2
        assert lrs[mid] == pytest.approx((peak + final_ratio * peak) / 2)


def test_lr_schedule_seer_numbers():
    """docs/method.md §4: warmup from 0.15 to 9.6 over 8K iterations, cosine to 1/1000 of the peak."""
    total, warmup, peak = 122_000, 8000, 9.6
    assert lr_at(0, total, peak, warmup, 0.15 / 9.6, 0.001) == pytest.approx(0.15)
    assert lr_at(4000, total, peak, warmup, 0.15 / 9.6, 0.001) == pytest.approx((0.15 + 9.6) / 2)
    assert lr_at(warmup, total, peak, warmup, 0.15 / 9.6, 0.001) == pytest.approx(9.6)
    assert lr_at(total - 1, total, peak, warmup, 0.15 / 9.6, 0.001) == pytest.approx(0.0096)
    assert math.isfinite(lr_at(total + 10, total, peak, warmup, 0.15 / 9.6, 0.001))


def test_lr_schedule_under_a_time_budget_follows_the_spent_share():
    """optim.minutes: the cosine follows whichever is further along, the steps or the time spent."""
    total, warmup, peak, final = 10_000, 10, 2.0, 0.001
    lr = lambda step, frac: lr_at(step, total, peak, warmup, 0.0, final, time_fraction=frac)  # noqa: E731
    assert lr(5, 0.9) == pytest.approx(1.0)  # warmup is counted in steps, whatever the clock says
    assert lr(100, 0.5) == pytest.approx((peak + final * peak) / 2)  # half the budget: half-way down
    assert lr(100, 1.0) == pytest.approx(final * peak)  # budget spent: the final LR
    assert lr(100, 1.7) == pytest.approx(final * peak)  # and never beyond it
    assert lr(100, 0.0) == pytest.approx(lr_at(100, total, peak, warmup, 0.0, final))  # no time spent: the steps
    assert lr(total - 1, 0.1) == pytest.approx(final * peak)  # the steps run out first: they decide
    fracs = [i / 50 for i in range(51)]
    lrs = [lr(200, f) for f in fracs]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # never up as the budget is spent
