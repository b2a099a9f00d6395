"""SwAV as SEER trained it (docs/method.md §5): head, prototypes, Sinkhorn-Knopp, swapped prediction, queue.

Read top-down: ``SwAV.forward`` runs each resolution group of crops through the trunk in one pass,
projects and L2-normalises, and scores against the prototypes. ``SwAVLoss`` turns the scores of the
global crops into soft targets with ``sinkhorn`` (fp32, no gradient, optionally with a queue of past
embeddings) and averages the cross-entropy of every other crop's prediction against them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import groupby

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .backbone import build_backbone, feature_dim, narrow_group_convs_in_fp32, pointwise_convs_as_matmul
from .checkpoint_file import CheckpointError


class ProjectionHead(nn.Module):
    """MLP trunk -> hidden... -> out; BN+ReLU between layers (BN optional: SEER has none)."""

    def __init__(self, in_dim: int, hidden: list[int], out_dim: int, batch_norm: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        dims = [in_dim, *hidden]
        for a, b in zip(dims[:-1], dims[1:]):
            layers.append(nn.Linear(a, b))
            if batch_norm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Linear(dims[-1], out_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class Prototypes(nn.Module):
    """K learnable prototype vectors (K x D), no bias; rows are kept unit-norm."""

    def __init__(self, dim: int, n_prototypes: int):
        super().__init__()
        self.layer = nn.Linear(dim, n_prototypes, bias=False)
        self.normalize_()

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight

    @torch.no_grad()
    def normalize_(self) -> None:
        """L2-normalise each prototype in place (at init and after every step that updates them)."""
        w = self.layer.weight
        w.copy_(F.normalize(w.float(), dim=1, p=2).to(w.dtype))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # the prototype layer stays in fp32 even under autocast (docs/method.md §4)
        with torch.autocast(device_type=z.device.type, enabled=False):
            return F.linear(z.float(), self.layer.weight.float())


class SwAV(nn.Module):
    """Backbone + projection head + prototypes. ``forward(crops) -> (z, scores)`` over all crops."""

    def __init__(self, backbone: nn.Module, head: ProjectionHead, prototypes: Prototypes,
                 channels_last: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.prototypes = prototypes
        self.channels_last = channels_last

    def features(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """Pooled trunk features of all crops, one trunk pass per resolution group (large first)."""
        feats = []
        for _, group in groupby(crops, key=lambda c: tuple(c.shape[-2:])):
            group = list(group)
            x = torch.cat(group) if len(group) > 1 else group[0]
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            feats.append(self.backbone(x))
        return torch.cat(feats)

    def forward(self, crops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.head(self.features(crops))
        z = F.normalize(z.float(), dim=1, p=2)
        return z, self.prototypes(z)


def build_swav(cfg, device: str | torch.device = "cpu") -> SwAV:
    """The SwAV meta-architecture from a ``Config``."""
    m = cfg.model
    backbone = build_backbone(m.arch, zero_init_last=m.zero_init_last, device=device, stem_stride=m.stem_stride,
                              in_chans=m.in_chans)
    with torch.device(device):
        head = ProjectionHead(feature_dim(backbone), list(m.head_hidden), m.head_out, m.head_bn)
        protos = Prototypes(m.head_out, cfg.swav.n_prototypes)
    if m.channels_last and m.pointwise_matmul:
        pointwise_convs_as_matmul(backbone)
    if m.narrow_group_fp32:
        narrow_group_convs_in_fp32(backbone)
    model = SwAV(backbone, head, protos, channels_last=m.channels_last)
    if m.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


# ---------------------------------------------------------------- Sinkhorn-Knopp


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _gather_cat(t: torch.Tensor, dim: int) -> torch.Tensor:
    """All ranks' tensors concatenated along ``dim`` in rank order (collective under torchrun)."""
    if _world() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(_world())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=dim)


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():  # any open group, one rank included
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def _global_logsumexp(x: torch.Tensor, dim: int | tuple[int, ...]) -> torch.Tensor:
    """log(sum(exp(x))) over ``dim`` (kept) and over all ranks, without overflow: one MAX and one SUM
    all-reduce for every problem in the batch together."""
    m = _all_reduce(x.amax(dim=dim, keepdim=True), dist.ReduceOp.MAX)
    return m + torch.log(_all_reduce(torch.exp(x - m).sum(dim=dim, keepdim=True)))


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float, iters: int) -> torch.Tensor:
    """Equipartitioned soft assignments (B_local x K) from scores (B_local x K), across all ranks.

    Q = exp(scores / eps)^T divided by its global sum; then ``iters`` times: rows divided by their
    global sums and by K, columns by their local sums and by the global B; finally times B so each
    row of the result sums to 1. Computed in the log domain (every sum is a max-shifted logsumexp),
    so large scores or a small epsilon cannot underflow a whole row or column to 0/0. Only scalars
    and K-vectors (row maxima and row sums) cross ranks, so the result equals a single process on
    the concatenated batch.

    ``scores`` may also be a stack (T x B_local x K) of independent problems, e.g. both target crops:
    they are solved together, so each all-reduce carries all T of them (half the collectives for 2).
    """
    single = scores.dim() == 2
    log_q = scores.float() / epsilon  # (T x) B_local x K: Q transposed, kept in the scores' own layout
    if single:
        log_q = log_q.unsqueeze(0)
    k = log_q.shape[-1]
    b = log_q.shape[-2] * _world()
    log_q = log_q - _global_logsumexp(log_q, dim=(-2, -1))
    for _ in range(iters):
        log_q -= _global_logsumexp(log_q, dim=-2) + math.log(k)  # Q's rows: one per prototype, global
        log_q -= torch.logsumexp(log_q, dim=-1, keepdim=True) + math.log(b)  # Q's columns: one per sample
    q = torch.exp(log_q + math.log(b))
    return q[0] if single else q


# ---------------------------------------------------------------- loss and queue


class SwAVQueue(nn.Module):
    """Ring buffer of past embeddings per target crop; this rank's share of the global length.

    Filled from ``start_step`` on; joined to the batch for Sinkhorn only once full (the order of its
    rows does not matter to Sinkhorn, so a push writes over the oldest rows in place, at ``pos``,
    instead of shifting the whole queue). ``filled`` and ``pos`` are buffers (saved in checkpoints)
    mirrored as Python ints, so deciding whether the queue is full never waits for the device.
    """

    def __init__(self, n_targets: int, length: int, dim: int):
        super().__init__()
        self.register_buffer("embeddings", torch.zeros(n_targets, length, dim))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("pos", torch.zeros((), dtype=torch.long))
        self._filled = 0
        self._pos = 0

    @property
    def length(self) -> int:
        return self.embeddings.shape[1]

    @property
    def full(self) -> bool:
        return self._filled >= self.length

    @property
    def n_filled(self) -> int:
        return self._filled

    @property
    def write_pos(self) -> int:
        return self._pos

    @torch.no_grad()
    def push_all(self, z: torch.Tensor) -> None:
        """Write ``z`` (T x n x D, one row block per target crop) over the oldest ``n`` rows of every queue."""
        n = min(z.shape[1], self.length)
        z = z[:, :n].detach().to(self.embeddings.dtype)
        first = min(n, self.length - self._pos)
        self.embeddings[:, self._pos:self._pos + first] = z[:, :first]
        if first < n:  # wrap around
            self.embeddings[:, :n - first] = z[:, first:]
        self._pos = (self._pos + n) % self.length
        self._filled = min(self._filled + n, self.length)
        self.pos.fill_(self._pos)
        self.filled.fill_(self._filled)

    def load(self, embeddings: torch.Tensor, filled: int, pos: int) -> None:
        """Set the queue's contents (from a checkpoint) and its host-side counters."""
        with torch.no_grad():
            self.embeddings.copy_(embeddings)
        self._filled, self._pos = min(int(filled), self.length), int(pos) % self.length
        self.filled.fill_(self._filled)
        self.pos.fill_(self._pos)

    def _load_from_state_dict(self, *args, **kwargs):  # nn.Module.load_state_dict: keep the mirrors right
        super()._load_from_state_dict(*args, **kwargs)
        self._filled, self._pos = int(self.filled), int(self.pos)


def load_queue(saved: dict, queue: SwAVQueue, rank: int, world_size: int, path) -> None:
    """This rank's share of a saved queue. Same world size: the ring as it was (bit-exact resume).
    Another world size, or a checkpoint from before the ring buffer (no ``pos``: each rank's share
    stored newest first, shifted every step): every saved share is put oldest-first, the whole queue
    re-dealt, and writing starts over the oldest rows again, as the old queue would have dropped them."""
    full = saved["embeddings"]
    share = queue.length
    if full.shape[1] != share * world_size or full.shape[2] != queue.embeddings.shape[2]:
        raise CheckpointError(f"checkpoint {path} queue shape {tuple(full.shape)} does not fit swav.queue_length")
    filled = min(int(saved["filled"]) // world_size, share)
    saved_world = int(saved.get("world_size", 0))
    if "pos" in saved and saved_world == world_size:
        queue.load(full[:, rank * share:(rank + 1) * share], filled, int(saved["pos"]))
        return
    old_share = full.shape[1] // saved_world if saved_world else share
    parts = []
    for r in range(full.shape[1] // old_share):
        part = full[:, r * old_share:(r + 1) * old_share]
        parts.append(part.roll(-int(saved["pos"]), dims=1) if "pos" in saved else part.flip(1))
    oldest_first = torch.cat(parts, dim=1)
    queue.load(oldest_first[:, rank * share:(rank + 1) * share], filled, 0)


class SwAVLoss:
    """Swapped prediction: each target crop's Sinkhorn codes predicted from every other crop."""

    def __init__(self, n_crops: int, crops_for_assign: list[int], temperature: float, epsilon: float,
                 sinkhorn_iters: int, queue: SwAVQueue | None = None, queue_start_step: int = 0):
        self.n_crops = n_crops
        self.crops_for_assign = list(crops_for_assign)
        self.temperature = temperature
        self.epsilon = epsilon
        self.sinkhorn_iters = sinkhorn_iters
        self.queue = queue
        self.queue_start_step = queue_start_step

    def uses_queue(self) -> bool:
        """Whether the next ``targets`` call joins the queue (so the prototypes must be whole)."""
        return self.queue is not None and self.queue.full

    def targets(self, z: torch.Tensor, scores: torch.Tensor, prototypes: torch.Tensor | None,
                step: int) -> dict[int, torch.Tensor]:
        """Soft codes q (B x K) for each target crop, without gradient: one batched Sinkhorn for all
        target crops. ``prototypes`` (whole, K x D) are needed only when the queue is used."""
        bs = scores.shape[0] // self.n_crops
        idx = self.crops_for_assign
        with torch.no_grad():
            s = scores.detach().float().view(self.n_crops, bs, -1)[idx]  # T x B x K
            if self.uses_queue():
                queued = self.queue.embeddings @ prototypes.detach().float().t()  # T x L x K
                s = torch.cat([queued, s], dim=1)
            q = sinkhorn(s, self.epsilon, self.sinkhorn_iters)[:, -bs:]
            if self.queue is not None and step >= self.queue_start_step:
                self.queue.push_all(z.detach().view(self.n_crops, bs, -1)[idx])
        return dict(zip(idx, q.unbind(0)))

    def __call__(self, scores: torch.Tensor, targets: dict[int, torch.Tensor]) -> torch.Tensor:
        """Mean over target crops i of the mean over crops v != i of CE(q_i, softmax(scores_v / tau)).

        Each (target, crop) pair is contracted on its own, as the reference does: a sum over the K
        prototypes, then a mean over the batch, both as pairwise-summed reductions. (One fp32 matrix
        product over B*K, the earlier form, rounded with an error growing with B x K: 4e-4 at 256 x
        16000.) ``tests/model/test_swav.py`` pins value and gradient against float64 at SEER's sizes."""
        bs = scores.shape[0] // self.n_crops
        logp = F.log_softmax(scores.float() / self.temperature, dim=1).view(self.n_crops, bs, -1)  # V x B x K
        crops = list(targets)
        # cross[t, v] = mean over the batch of CE(q_t, p_v); one V x B x K product per target crop
        cross = torch.stack([-(targets[i][None] * logp).sum(dim=-1).mean(dim=-1) for i in crops])  # T x V
        d = cross.device
        others = (torch.arange(self.n_crops, device=d)[None, :] != torch.tensor(crops, device=d)[:, None]).float()
        return ((cross * others).sum(dim=1) / (self.n_crops - 1)).mean()


def assignment_counts(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prototypes in use (distinct arg-max over the batch's crops) and entropy (nats) of their
    histogram, as 0-d device tensors: nothing waits for the device (no boolean indexing, no bincount)."""
    with torch.no_grad():
        idx = scores.argmax(dim=1)
        counts = torch.zeros(scores.shape[1], device=scores.device).scatter_add_(
            0, idx, torch.ones(idx.shape, device=scores.device))
        p = counts / counts.sum()
        return (counts > 0).sum(), -torch.special.xlogy(p, p).sum()


def assignment_stats(scores: torch.Tensor) -> tuple[int, float]:
    """``assignment_counts`` as Python numbers (waits for the device)."""
    used, entropy = assignment_counts(scores)
    return int(used), float(entropy)


def ln_k(n_prototypes: int) -> float:
    return math.log(n_prototypes)


# ---------------------------------------------------------------- the method object


@dataclass
class MethodOutput:
    """What a method's ``forward_backward`` hands the loop: the loss (0-d, detached, fp32, as it was
    backpropagated before any grad scaling), device-side statistics to average over a log window
    (0-d tensors, never read between log steps), and what a bad-step diagnostic needs."""

    loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    diagnostic: dict = field(default_factory=dict)


def _whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP (DTensor) shard, gathered from all ranks; other tensors as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class SwAVMethod:
    """SwAV's part of a training step, owned in one place: head, prototypes, queue and loss.

    ``model`` is the trained module as the loop runs it (possibly wrapped in DDP/FSDP): its forward
    maps crops to ``(z, scores)``. ``forward_backward`` runs forward, Sinkhorn targets (with the
    queue, whose scores need the WHOLE prototypes: gathered under FSDP only then), the swapped loss and
    backward, and drops the prototype gradient while they are frozen; ``after_step`` re-normalises
    the prototypes after an optimiser step that updated them. The loop never touches prototypes, and
    saves and restores the queue through ``state_dict``/``load_state_dict`` without knowing it is there.
    """

    name = "pretrain"  # the label of the run's progress and log lines
    phases = ("forward", "sinkhorn", "backward")

    def __init__(self, model: nn.Module, cfg, queue: SwAVQueue | None = None, autocast=nullcontext):
        self.model = model
        self.net: SwAV = getattr(model, "module", model)  # DDP keeps the module inside
        self.queue = queue
        self.freeze_steps = cfg.swav.freeze_prototypes_steps
        self.autocast = autocast
        self.loss = SwAVLoss(cfg.n_crops, cfg.swav.crops_for_assign, cfg.swav.temperature, cfg.swav.epsilon,
                             cfg.swav.sinkhorn_iters, queue, cfg.swav.queue_start_step)
        self.collapse_loss = ln_k(cfg.swav.n_prototypes)  # a loss stuck near ln K: collapse (train/health.py)
        self.freeze_prototypes_steps = cfg.swav.freeze_prototypes_steps

    def row(self, means: dict) -> dict:
        """This method's columns of a metrics row, from the log window's means of ``stats``."""
        return {"prototypes_used": means.get("prototypes_used", 0.0),
                "assign_entropy": means.get("assign_entropy", 0.0), "ln_k": self.collapse_loss}

    def state_dict(self) -> dict:
        """What a checkpoint holds of this method besides the model and optimiser: the queue, saved whole
        (all ranks' shares in rank order, so a run can resume on another world size). A ring buffer:
        every rank's write position is the same (same per-rank batch every step). Collective under torchrun."""
        if self.queue is None:
            return {}
        world = _world()
        q = self.queue
        return {"queue": {"embeddings": _gather_cat(q.embeddings, dim=1), "filled": q.n_filled * world,
                          "pos": q.write_pos, "world_size": world}}

    def load_state_dict(self, state: dict, path="the checkpoint") -> None:
        """Restore this rank's share of the queue from a checkpoint's state (as ``state_dict`` wrote it,
        or an older layout; see ``load_queue``)."""
        if self.queue is None:
            return
        saved = state.get("queue")
        if saved is None:
            raise CheckpointError(f"checkpoint {path} has no queue but swav.queue_length > 0")
        world = saved.get("world_size") or state.get("schedule", {}).get("world_size", 0)
        load_queue({**saved, "world_size": world}, self.queue, _rank(), _world(), path)

    def forward_backward(self, crops: list[torch.Tensor], step: int,
                         scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
                         mark: Callable[[str], None] | None = None) -> MethodOutput:
        """One forward and backward on this rank's crops. ``scale`` maps the loss to what is
        backpropagated (a grad scaler, fault injection); ``mark(phase)`` is called as each of
        ``phases`` ends (phase timing)."""
        mark = mark or (lambda _: None)
        with self.autocast():
            z, scores = self.model(crops)
        mark("forward")
        protos = _whole(self.net.prototypes.weight) if self.loss.uses_queue() else None
        targets = self.loss.targets(z, scores, protos, step)
        mark("sinkhorn")
        loss = self.loss(scores, targets)
        (scale(loss) if scale else loss).backward()
        if step < self.freeze_steps:
            self.net.prototypes.layer.weight.grad = None  # frozen: no grad, no momentum, no decay
        mark("backward")
        used, entropy = assignment_counts(scores.detach())
        return MethodOutput(loss.detach(), {"prototypes_used": used, "assign_entropy": entropy},
                            {"scores": scores.detach(), "targets": targets})

    def after_step(self, step: int) -> None:
        """After a successful optimiser step: unit prototype rows for the next forward (frozen ones
        are left bit-identical)."""
        if step >= self.freeze_steps:
            self.net.prototypes.normalize_()

    def diagnose(self, out: MethodOutput) -> dict:
        """JSON-ready facts about a non-finite step (scores and assignments of this rank)."""
        s = out.diagnostic["scores"].float()
        finite = torch.isfinite(s)
        return {
            "scores_finite_fraction": float(finite.float().mean()),
            "scores_absmax": float(s[finite].abs().max()) if finite.any() else float("nan"),
            "scores_sample": s[:8].tolist(),
            "assignments_sample": {str(i): q[:8].argmax(1).tolist() for i, q in out.diagnostic["targets"].items()},
        }
