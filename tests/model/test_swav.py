"""SwAV: Sinkhorn-Knopp, the swapped-prediction loss against a hand computation, prototypes, queue."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from openseer.model.backbone import BackboneError, build_backbone, count_parameters, feature_dim
from openseer.model.swav import (
    Prototypes,
    SwAVLoss,
    SwAVQueue,
    assignment_stats,
    build_swav,
    ln_k,
    sinkhorn,
)
from tests.conftest import tiny_config


def _scores(b: int, k: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(b, d, generator=g), dim=1)
    c = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return z @ c.t()


# ---------------------------------------------------------------- Sinkhorn


@pytest.mark.parametrize(("b", "k"), [(64, 8), (16, 30), (32, 32)])
def test_sinkhorn_rows_are_distributions_and_prototypes_equipartitioned(b, k):
    scores = _scores(b, k)
    for iters in (1, 3):
        q = sinkhorn(scores, 0.05, iters)
        assert q.shape == (b, k)
        assert (q >= 0).all()
        assert torch.allclose(q.sum(dim=1), torch.ones(b), atol=1e-5)  # each sample: a distribution
    q = sinkhorn(scores, 0.05, 200)
    assert torch.allclose(q.sum(dim=0), torch.full((k,), b / k), rtol=1e-3)  # each prototype: B/K
    assert torch.allclose(q.sum(dim=1), torch.ones(b), atol=1e-5)


def test_sinkhorn_balances_more_with_more_iterations():
    scores = _scores(48, 12, seed=1)
    err = [float((sinkhorn(scores, 0.05, it).sum(0) - 48 / 12).abs().max()) for it in (1, 3, 10, 50)]
    assert err == sorted(err, reverse=True)
    assert err[-1] < 1e-3 < err[0]


def test_sinkhorn_matches_a_plain_reference():
    """The textbook algorithm (docs/method.md §5.4) in float64, written out without the implementation."""
    scores = _scores(10, 4, seed=2)
    eps, iters = 0.05, 3
    q = torch.exp(scores.double() / eps).t()
    q /= q.sum()
    k, b = q.shape
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    expected = (q * b).t()
    assert torch.allclose(sinkhorn(scores, eps, iters).double(), expected, atol=1e-5)


def test_sinkhorn_is_invariant_to_a_constant_shift():
    scores = _scores(32, 10, seed=3)
    a = sinkhorn(scores, 0.05, 3)
    for c in (-7.0, 0.5, 100.0):  # (scores + 100 itself rounds in fp32: hence the relative tolerance)
        assert torch.allclose(sinkhorn(scores + c, 0.05, 3), a, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize(("scale", "eps"), [(1000.0, 0.03), (1e4, 0.03), (50.0, 0.01)])
def test_sinkhorn_is_finite_for_large_scores(scale, eps):
    scores = _scores(64, 20, seed=4) * scale
    q = sinkhorn(scores, eps, 3)
    assert torch.isfinite(q).all()
    assert (q >= 0).all()
    assert torch.allclose(q.sum(dim=1), torch.ones(64), atol=1e-4)
    # the equipartition still acts: more prototypes get samples than the plain arg-max uses
    assert q.argmax(dim=1).unique().numel() >= scores.argmax(dim=1).unique().numel()


def test_sinkhorn_is_fp32_and_gradient_free_for_half_inputs():
    scores = _scores(16, 6).to(torch.bfloat16).requires_grad_()
    q = sinkhorn(scores, 0.05, 3)
    assert q.dtype == torch.float32
    assert not q.requires_grad


# ---------------------------------------------------------------- loss


def _hand_loss(scores: list[list[float]], targets: dict[int, list[list[float]]], n_crops: int,
               tau: float) -> float:
    """docs/method.md §5.5 with plain Python loops."""
    bs = len(scores) // n_crops
    total = 0.0
    for i, q in targets.items():
        sub = 0.0
        for v in range(n_crops):
            if v == i:
                continue
            ce = 0.0
            for b in range(bs):
                row = scores[v * bs + b]
                logits = [s / tau for s in row]
                m = max(logits)
                log_norm = m + math.log(sum(math.exp(x - m) for x in logits))
                ce += -sum(qk * (x - log_norm) for qk, x in zip(q[b], logits))
            sub += ce / bs
        total += sub / (n_crops - 1)
    return total / len(targets)


def test_loss_equals_a_hand_computation():
    # 3 crops x B=2 samples, K=3 prototypes; rows grouped crop by crop
    scores = [
        [0.9, -0.2, 0.1], [0.3, 0.4, -0.5],  # crop 0
        [0.2, 0.7, -0.1], [-0.6, 0.1, 0.8],  # crop 1
        [0.5, 0.5, 0.0], [0.05, -0.3, 0.25],  # crop 2
    ]
    targets = {0: [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], 1: [[0.2, 0.5, 0.3], [0.0, 0.1, 0.9]]}
    loss = SwAVLoss(n_crops=3, crops_for_assign=[0, 1], temperature=0.1, epsilon=0.05, sinkhorn_iters=3)
    got = loss(torch.tensor(scores), {i: torch.tensor(q) for i, q in targets.items()})
    expected = _hand_loss(scores, targets, 3, 0.1)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # a value worked out once by hand too, so the reference itself is pinned
    assert expected == pytest.approx(_hand_loss(scores, targets, 3, 0.1))
    # one target crop only: the mean over the other two crops of that crop's codes
    only0 = loss(torch.tensor(scores), {0: torch.tensor(targets[0])})
    assert float(only0) == pytest.approx(_hand_loss(scores, {0: targets[0]}, 3, 0.1), rel=1e-5)


@pytest.mark.parametrize("bs,k", [(256, 3000), (256, 16000)])
def test_loss_value_and_gradient_match_float64_at_seer_sizes(bs, k):
    """SwAV-like scores (cosines of unit vectors) at SEER's prototype counts, 2 + 6 crops: the fp32 loss
    and its gradient with respect to the scores stay within float noise of the same loss in float64
    (the one-matrix-product form was 4e-4 off at 256 x 16000; the per-pair form about 4e-7)."""
    g = torch.Generator().manual_seed(0)
    n_crops, crops = 8, [0, 1]
    z = F.normalize(torch.randn(n_crops * bs, 128, generator=g), dim=1)
    protos = F.normalize(torch.randn(k, 128, generator=g), dim=1)
    scores = z @ protos.t()
    targets = {i: torch.softmax(3 * torch.randn(bs, k, generator=g), dim=1) for i in crops}
    loss_fn = SwAVLoss(n_crops, crops, temperature=0.1, epsilon=0.05, sinkhorn_iters=3)

    def value_and_grad(dtype):
        s = scores.to(dtype).requires_grad_()
        logp = F.log_softmax(s / 0.1, dim=1).view(n_crops, bs, k)  # the reference: pair by pair
        pairs = [-(targets[i].to(dtype) * logp[v]).sum(dim=1).mean() for i in crops for v in range(n_crops) if v != i]
        ref = torch.stack(pairs).view(len(crops), n_crops - 1).mean(dim=1).mean()
        ref.backward()
        return ref.detach(), s.grad

    ref, ref_grad = value_and_grad(torch.float64)
    s = scores.clone().requires_grad_()
    got = loss_fn(s, targets)
    got.backward()
    assert got.dtype == torch.float32
    assert abs(float(got.detach()) - float(ref)) < 2e-6 * max(1.0, abs(float(ref)))
    assert (s.grad.double() - ref_grad).abs().max() < 1e-7
    # the float64 reference itself agrees with one fp64 matrix product (the two forms are the same sum)
    logp = F.log_softmax(scores.double() / 0.1, dim=1).view(n_crops, -1)
    q = torch.stack([targets[i].double() for i in crops]).reshape(len(crops), -1)
    cross = -(q @ logp.t()) / bs
    others = torch.ones(len(crops), n_crops, dtype=torch.float64)
    others[0, 0] = others[1, 1] = 0
    assert float(((cross * others).sum(1) / (n_crops - 1)).mean()) == pytest.approx(float(ref), rel=1e-12)


def test_loss_gradient_flows_to_scores_but_not_through_targets():
    scores = _scores(3 * 4, 5).requires_grad_()
    loss_fn = SwAVLoss(3, [0, 1], 0.1, 0.05, 3)
    z = torch.zeros(12, 16)
    targets = loss_fn.targets(z, scores, torch.zeros(5, 16), step=0)
    assert set(targets) == {0, 1}
    assert all(not q.requires_grad for q in targets.values())
    loss = loss_fn(scores, targets)
    loss.backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all()


def test_loss_is_about_ln_k_at_random_init_of_a_real_model():
    """regnety_002 with the tiny-cpu head and 300 prototypes, random images: loss ~ ln 300."""
    torch.manual_seed(0)
    cfg = tiny_config("model.arch=regnety_002", "model.head_hidden=[512]", "model.head_out=128",
                      "crops.sizes=[32,16]", "crops.counts=[2,4]", "swav.n_prototypes=300")
    model = build_swav(cfg)
    crops = [torch.randn(16, 3, s, s) for s in [32, 32, 16, 16, 16, 16]]
    with torch.no_grad():
        z, scores = model(crops)
    assert z.shape == (16 * 6, 128) and scores.shape == (16 * 6, 300)
    assert torch.allclose(z.norm(dim=1), torch.ones(len(z)), atol=1e-5)  # L2-normalised embeddings
    assert float(scores.abs().max()) <= 1 + 1e-5  # cosine scores
    loss_fn = SwAVLoss(cfg.n_crops, cfg.swav.crops_for_assign, cfg.swav.temperature, cfg.swav.epsilon,
                       cfg.swav.sinkhorn_iters)
    loss = float(loss_fn(scores, loss_fn.targets(z, scores, model.prototypes.weight, step=0)))
    assert 0.95 * ln_k(300) < loss < 1.15 * ln_k(300)


# ---------------------------------------------------------------- model parts


def test_swav_forward_groups_crops_by_resolution_large_first():
    cfg = tiny_config()
    model = build_swav(cfg).eval()
    calls = []
    model.backbone.register_forward_hook(lambda m, inp, out: calls.append(tuple(inp[0].shape)))
    crops = [torch.randn(4, 3, s, s) for s in [24, 24, 12, 12]]
    with torch.no_grad():
        z, scores = model(crops)
    assert calls == [(8, 3, 24, 24), (8, 3, 12, 12)]  # one trunk pass per resolution group
    assert z.shape == (16, cfg.model.head_out) and scores.shape == (16, cfg.swav.n_prototypes)
    # crop order is kept: each crop's rows match a forward of that crop alone
    with torch.no_grad():
        z_alone, _ = model([crops[2]])
    assert torch.allclose(z[8:12], z_alone, atol=1e-5)


def test_head_without_batch_norm_as_in_seer():
    cfg = tiny_config("model.head_bn=false", "model.head_hidden=[48,40]", "model.head_out=24")
    model = build_swav(cfg)
    layers = list(model.head.mlp)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in layers)
    linears = [m for m in layers if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (feature_dim(model.backbone), 48), (48, 40), (40, 24)]
    assert model.prototypes.layer.bias is None


def test_prototypes_are_unit_norm_at_init_and_after_normalize():
    p = Prototypes(16, 40)
    assert torch.allclose(p.weight.norm(dim=1), torch.ones(40), atol=1e-6)
    with torch.no_grad():
        p.weight.mul_(3.0).add_(0.1)
    p.normalize_()
    assert torch.allclose(p.weight.norm(dim=1), torch.ones(40), atol=1e-6)


def test_prototype_scores_stay_fp32_under_autocast():
    p = Prototypes(8, 5)
    z = F.normalize(torch.randn(4, 8), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = p(z.bfloat16())
    assert s.dtype == torch.float32


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(BackboneError, match="regnety_9999"):
        build_backbone("regnety_9999")


def test_seer_backbones_build_on_the_meta_device():
    """docs/method.md §2: timm's RegNetY-32GF trunk has about 141M parameters."""
    net = build_backbone("regnety_320", device="meta")
    assert 135e6 < count_parameters(net) < 150e6
    assert feature_dim(net) == 3712


# ---------------------------------------------------------------- queue


def test_queue_is_a_ring_that_overwrites_the_oldest_rows_and_is_used_once_full():
    q = SwAVQueue(n_targets=2, length=6, dim=2)
    a = torch.tensor([[1.0, 1], [2, 2], [3, 3]])
    b = torch.tensor([[4.0, 4], [5, 5], [6, 6]])
    q.push_all(torch.stack([a, -a]))
    assert not q.full and q.n_filled == 3 and q.write_pos == 3
    q.push_all(torch.stack([b, -b]))
    assert q.full
    assert q.embeddings[0, :, 0].tolist() == [1, 2, 3, 4, 5, 6]
    assert q.embeddings[1, :, 0].tolist() == [-1, -2, -3, -4, -5, -6]
    q.push_all(torch.tensor([[[7.0, 7], [8, 8]], [[-7.0, -7], [-8, -8]]]))  # over the two oldest (1, 2)
    assert q.embeddings[0, :, 0].tolist() == [7, 8, 3, 4, 5, 6]
    q.push_all(torch.stack([a * 10, -a * 10]))  # wraps around: 3, 4, 5 were the oldest
    assert q.embeddings[0, :, 0].tolist() == [7, 8, 10, 20, 30, 6]
    assert int(q.filled) == 6 and int(q.pos) == q.write_pos == 5  # the buffers (checkpointed) follow


def test_queue_buffers_restore_the_host_counters():
    q = SwAVQueue(1, 4, 2)
    q.push_all(torch.ones(1, 3, 2))
    r = SwAVQueue(1, 4, 2)
    r.load_state_dict(q.state_dict())
    assert (r.n_filled, r.write_pos, r.full) == (3, 3, False)
    assert torch.equal(r.embeddings, q.embeddings)


def test_loss_uses_the_queue_for_sinkhorn_only_once_full():
    torch.manual_seed(0)
    bs, k, d = 4, 6, 8
    queue = SwAVQueue(2, 8, d)
    loss_fn = SwAVLoss(3, [0, 1], 0.1, 0.05, 3, queue=queue, queue_start_step=1)
    protos = F.normalize(torch.randn(k, d), dim=1)

    def batch():
        z = F.normalize(torch.randn(3 * bs, d), dim=1)
        return z, z @ protos.t()

    z, s = batch()
    loss_fn.targets(z, s, protos, step=0)  # before queue_start_step: nothing stored
    assert int(queue.filled) == 0
    z1, s1 = batch()
    t1 = loss_fn.targets(z1, s1, protos, step=1)
    assert int(queue.filled) == bs
    assert torch.equal(queue.embeddings[0, :bs], z1[:bs]) and torch.equal(queue.embeddings[1, :bs], z1[bs:2 * bs])
    assert torch.allclose(t1[0], sinkhorn(s1[:bs], 0.05, 3))  # not full yet: batch only
    z2, s2 = batch()
    loss_fn.targets(z2, s2, protos, step=2)
    assert queue.full
    z3, s3 = batch()
    stored = queue.embeddings[0].clone()
    t3 = loss_fn.targets(z3, s3, protos, step=3)
    joined = torch.cat([stored @ protos.t(), s3[:bs]])
    assert torch.allclose(t3[0], sinkhorn(joined, 0.05, 3)[-bs:], atol=1e-6)
    assert not torch.allclose(t3[0], sinkhorn(s3[:bs], 0.05, 3), atol=1e-3)


def test_assignment_stats_counts_used_prototypes():
    scores = torch.tensor([[1.0, 0, 0], [0.9, 0, 0.1], [0, 0, 1], [0, 0, 2]])
    used, entropy = assignment_stats(scores)
    assert used == 2
    assert entropy == pytest.approx(math.log(2))


def test_the_method_owns_its_queue_state_under_the_checkpoints_own_keys():
    """``SwAVMethod.state_dict`` is what the loop merges into a checkpoint: the ``queue`` entry with the
    keys checkpoints have always had; ``load_state_dict`` restores it (and reads older checkpoints whose
    queue has no world size from their schedule); without a queue it is empty."""
    from openseer.model.checkpoint_file import CheckpointError
    from openseer.model.swav import SwAVMethod, SwAVQueue, build_swav

    cfg = tiny_config()
    model = build_swav(cfg)
    queue = SwAVQueue(2, 4, cfg.model.head_out)
    for v in range(1, 4):
        queue.push_all(torch.full((2, 2, cfg.model.head_out), float(v)))
    state = SwAVMethod(model, cfg, queue).state_dict()
    assert set(state) == {"queue"} and set(state["queue"]) == {"embeddings", "filled", "pos", "world_size"}
    assert state["queue"]["filled"] == 4 and state["queue"]["pos"] == 2 and state["queue"]["world_size"] == 1
    again = SwAVQueue(2, 4, cfg.model.head_out)
    SwAVMethod(model, cfg, again).load_state_dict(state, "ckpt")
    assert torch.equal(again.embeddings, queue.embeddings) and again.write_pos == 2 and again.full
    old = {"queue": {k: v for k, v in state["queue"].items() if k != "world_size"}, "schedule": {"world_size": 1}}
    older = SwAVQueue(2, 4, cfg.model.head_out)
    SwAVMethod(model, cfg, older).load_state_dict(old, "ckpt")
    assert torch.equal(older.embeddings, queue.embeddings) and older.write_pos == 2
    with pytest.raises(CheckpointError, match="ckpt has no queue but swav.queue_length > 0"):
        SwAVMethod(model, cfg, SwAVQueue(2, 4, cfg.model.head_out)).load_state_dict({}, "ckpt")
    assert SwAVMethod(model, cfg).state_dict() == {}
    SwAVMethod(model, cfg).load_state_dict(state, "ckpt")  # a queue in the checkpoint, none configured: ignored
