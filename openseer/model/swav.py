"""SwAV as SEER trained it (SEER.md §5): head, prototypes, Sinkhorn-Knopp, swapped prediction, queue.

Read top-down: ``SwAV.forward`` runs each resolution group of crops through the trunk in one pass,
projects and L2-normalises, and scores against the prototypes. ``SwAVLoss`` turns the scores of the
global crops into soft targets with ``sinkhorn`` (fp32, no gradient, optionally with a queue of past
embeddings) and averages the cross-entropy of every other crop's prediction against them.
"""

from __future__ import annotations

import math
from itertools import groupby

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .backbone import build_backbone, feature_dim, narrow_group_convs_in_fp32, pointwise_convs_as_matmul


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
        # the prototype layer stays in fp32 even under autocast (SEER.md §4)
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
    backbone = build_backbone(m.arch, zero_init_last=m.zero_init_last, device=device, stem_stride=m.stem_stride)
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


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if _world() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def _global_logsumexp(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """log(sum(exp(x))) over ``dim`` (all elements when None) and over all ranks, without overflow."""
    if dim is None:
        m = _all_reduce(x.max().clone(), dist.ReduceOp.MAX if _world() > 1 else None)
        return m + torch.log(_all_reduce(torch.exp(x - m).sum()))
    m = _all_reduce(x.amax(dim=dim, keepdim=True).clone(), dist.ReduceOp.MAX if _world() > 1 else None)
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
    """
    log_q = (scores.float() / epsilon).t()  # K x B_local
    k = log_q.shape[0]
    b = log_q.shape[1] * _world()
    log_q = log_q - _global_logsumexp(log_q)
    for _ in range(iters):
        log_q -= _global_logsumexp(log_q, dim=1) + math.log(k)
        log_q -= torch.logsumexp(log_q, dim=0, keepdim=True) + math.log(b)
    return torch.exp(log_q + math.log(b)).t()


# ---------------------------------------------------------------- loss and queue


class SwAVQueue(nn.Module):
    """FIFO of past embeddings per target crop; this rank's share of the global length.

    Filled from ``start_step`` on; joined to the batch for Sinkhorn only once full; part of the
    training state (buffers, so it is saved in checkpoints).
    """

    def __init__(self, n_targets: int, length: int, dim: int):
        super().__init__()
        self.register_buffer("embeddings", torch.zeros(n_targets, length, dim))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @property
    def length(self) -> int:
        return self.embeddings.shape[1]

    @property
    def full(self) -> bool:
        return int(self.filled) >= self.length

    @torch.no_grad()
    def push(self, j: int, z: torch.Tensor) -> None:
        """Shift queue ``j`` by ``len(z)`` and put ``z`` at the front (newest first)."""
        n = min(len(z), self.length)
        e = self.embeddings[j]
        e[n:] = e[:-n].clone() if n < self.length else e[n:]
        e[:n] = z[:n].detach().to(e.dtype)

    @torch.no_grad()
    def advance(self, n: int) -> None:
        self.filled.fill_(min(int(self.filled) + n, self.length))


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
        self.last_targets: dict[int, torch.Tensor] = {}

    def targets(self, z: torch.Tensor, scores: torch.Tensor, prototypes: torch.Tensor,
                step: int) -> dict[int, torch.Tensor]:
        """Soft codes q (B x K) for each target crop, without gradient."""
        bs = scores.shape[0] // self.n_crops
        out = {}
        with torch.no_grad():
            use_queue = self.queue is not None and self.queue.full
            for j, i in enumerate(self.crops_for_assign):
                s = scores[i * bs:(i + 1) * bs].detach().float()
                if use_queue:
                    s = torch.cat([self.queue.embeddings[j] @ prototypes.detach().float().t(), s])
                out[i] = sinkhorn(s, self.epsilon, self.sinkhorn_iters)[-bs:]
            if self.queue is not None and step >= self.queue_start_step:
                for j, i in enumerate(self.crops_for_assign):
                    self.queue.push(j, z[i * bs:(i + 1) * bs])
                self.queue.advance(bs)
        self.last_targets = out
        return out

    def __call__(self, scores: torch.Tensor, targets: dict[int, torch.Tensor]) -> torch.Tensor:
        bs = scores.shape[0] // self.n_crops
        logp = F.log_softmax(scores.float() / self.temperature, dim=1)
        total = scores.new_zeros(())
        for i, q in targets.items():
            sub = scores.new_zeros(())
            for v in range(self.n_crops):
                if v != i:
                    sub = sub - (q * logp[v * bs:(v + 1) * bs]).sum(dim=1).mean()
            total = total + sub / (self.n_crops - 1)
        return total / len(targets)


def assignment_stats(scores: torch.Tensor) -> tuple[int, float]:
    """Prototypes in use (distinct arg-max over the batch's crops) and entropy (nats) of their histogram."""
    with torch.no_grad():
        idx = scores.argmax(dim=1)
        counts = torch.bincount(idx, minlength=scores.shape[1]).float()
        p = counts[counts > 0] / counts.sum()
        return int((counts > 0).sum()), float(-(p * p.log()).sum())


def ln_k(n_prototypes: int) -> float:
    return math.log(n_prototypes)
