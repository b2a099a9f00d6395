"""Linear probe on frozen features: multinomial logistic regression, hyper-parameters chosen on a
validation split carved from train (never on test), then retrained on all of train.

Features are standardised with the mean/std of the data being fitted. Training is mini-batch SGD
(Nesterov momentum, cosine LR) on CPU torch, about 30 epochs capped at 1000 steps, with the whole
grid trained side by side on the same batches, so a 60k x 368 probe takes seconds. Banks too large for memory are read batch by batch from the
memory-mapped cache.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from .common import stratified_take
from .knn import topk_accuracy

LRS = (0.01, 0.1, 1.0)
WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2)
IN_MEMORY_BYTES = 4 << 30


class Features:
    """Rows of a (possibly memory-mapped) feature matrix, standardised with a mean/std.

    Sets that fit in memory are copied and standardised once; larger ones are read and
    standardised batch by batch.
    """

    def __init__(self, x: np.ndarray, rows: np.ndarray | None = None):
        self.rows = np.arange(len(x)) if rows is None else np.asarray(rows, dtype=np.int64)
        self.dim = int(x.shape[1])
        self.x: np.ndarray | torch.Tensor = x
        if len(self.rows) * self.dim * 4 <= IN_MEMORY_BYTES:
            picked = np.asarray(x if rows is None else x[self.rows], dtype=np.float32)
            self.x = torch.from_numpy(np.array(picked, copy=True))
            self.rows = np.arange(len(self.rows))
        self.mean = torch.zeros(self.dim)  # the standardisation this set uses
        self.std = torch.ones(self.dim)
        self._applied = False  # True once an in-memory copy has been standardised

    def __len__(self) -> int:
        return len(self.rows)

    def _raw(self, r: np.ndarray) -> torch.Tensor:
        if isinstance(self.x, torch.Tensor):
            return self.x[torch.from_numpy(r)]
        order = np.argsort(r)  # sorted reads from a memory map
        t = torch.empty(len(r), self.dim)
        t[torch.from_numpy(order)] = torch.from_numpy(np.asarray(self.x[r[order]], dtype=np.float32))
        return t

    def get(self, i: np.ndarray) -> torch.Tensor:
        t = self._raw(self.rows[i])
        return t if self._applied else (t - self.mean) / self.std

    def standardise(self, like: Features | None = None, chunk: int = 65536) -> None:
        """Use ``like``'s mean/std, or fit this set's own (features with no spread are left unscaled)."""
        if like is None:
            s = torch.zeros(self.dim, dtype=torch.float64)
            s2 = torch.zeros_like(s)
            for a in range(0, len(self), chunk):
                t = self._raw(self.rows[a:a + chunk]).double()
                s += t.sum(0)
                s2 += (t * t).sum(0)
            mean = s / len(self)
            std = (s2 / len(self) - mean * mean).clamp_min(0).sqrt()
            std[std < 1e-6] = 1.0
            self.mean, self.std = mean.float(), std.float()
        else:
            self.mean, self.std = like.mean, like.std
        if isinstance(self.x, torch.Tensor):
            self.x.sub_(self.mean).div_(self.std)
            self._applied = True


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run small-matrix work on ``n`` threads: on a shared 2-core machine one thread is several times faster."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class LogRegGrid(torch.nn.Module):
    """G softmax regressions (one per grid point) trained side by side on the same batches."""

    def __init__(self, n_models: int, dim: int, n_classes: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(dim, n_models * n_classes))  # one GEMM for the grid
        self.bias = torch.nn.Parameter(torch.zeros(n_models * n_classes))
        self.shape = (n_models, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) -> (G, B, C)
        return torch.addmm(self.bias, x, self.weight).view(len(x), *self.shape).transpose(0, 1)


def train_logreg(x: Features, y: np.ndarray, n_classes: int, lrs: list[float], wds: list[float],
                 steps: int, batch_size: int = 1024, seed: int = 0) -> LogRegGrid:
    """One softmax regression per (lrs[i], wds[i]), by SGD with Nesterov momentum 0.9 and a cosine LR;
    all of them in one pass over the same batches (a grid costs about as much as one model)."""
    gen = torch.Generator().manual_seed(seed)
    model = LogRegGrid(len(lrs), x.dim, n_classes)
    n_classes_rep = torch.full((len(lrs),), n_classes)
    lr0 = torch.tensor(lrs).repeat_interleave(n_classes_rep)  # per column of the weight matrix
    wd = torch.tensor(wds).repeat_interleave(n_classes_rep)
    bufs = [torch.zeros_like(p) for p in model.parameters()]
    y_t = torch.as_tensor(y, dtype=torch.long)
    bs = min(batch_size, len(x))
    per_epoch = max(1, len(x) // bs)
    perm = torch.randperm(len(x), generator=gen)
    for step in range(steps):
        j = step % per_epoch
        if j == 0 and step:
            perm = torch.randperm(len(x), generator=gen)
        idx = perm[j * bs:(j + 1) * bs].numpy()
        logits = model(x.get(idx))
        target = y_t[idx].repeat(len(lrs))
        # sum over grid points of each one's mean loss: the gradients stay separate per grid point
        loss = F.cross_entropy(logits.reshape(-1, n_classes), target, reduction="sum") / len(idx)
        model.zero_grad(set_to_none=True)
        loss.backward()
        scale = 0.5 * (1 + math.cos(math.pi * step / steps))
        with torch.no_grad():
            for p, buf in zip(model.parameters(), bufs):
                g = p.grad + wd * p
                buf.mul_(0.9).add_(g)
                p.sub_(lr0 * scale * (g + 0.9 * buf))
    return model


@torch.no_grad()
def predict(model: LogRegGrid, x: Features, chunk: int = 65536) -> torch.Tensor:
    """Logits (G, N, C) of every grid point."""
    return torch.cat([model(x.get(np.arange(a, min(len(x), a + chunk)))) for a in range(0, len(x), chunk)], 1)


def default_steps(n: int, batch_size: int = 1024, epochs: int = 30, lo: int = 200, hi: int = 1000) -> int:
    """About ``epochs`` passes over the data, between ``lo`` and ``hi`` steps."""
    return int(min(hi, max(lo, epochs * max(1, n // min(batch_size, n)))))


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 n_classes: int, seed: int = 0, train_rows: np.ndarray | None = None,
                 lrs: tuple[float, ...] = LRS, wds: tuple[float, ...] = WEIGHT_DECAYS, steps: int = 0,
                 batch_size: int = 1024, val_fraction: float = 0.1) -> dict:
    """Top-1/top-5 (percent) on test, with the LR and weight decay chosen on a held-out part of train.

    ``train_rows`` selects rows of ``train_x`` (a low-shot subset) without copying a large bank;
    ``train_y`` is then the labels of those rows.
    """
    with torch_threads(1):
        return _linear_probe(train_x, train_y, test_x, test_y, n_classes, seed, train_rows, lrs, wds, steps,
                             batch_size, val_fraction)


def _linear_probe(train_x, train_y, test_x, test_y, n_classes, seed, train_rows, lrs, wds, steps, batch_size,
                  val_fraction) -> dict:
    rows = np.arange(len(train_x)) if train_rows is None else np.asarray(train_rows, dtype=np.int64)
    train_y = np.asarray(train_y)
    keys = [str(r) for r in rows]
    counts = np.bincount(train_y, minlength=n_classes)
    can_hold_out = counts[counts > 0].min() >= 2
    val = stratified_take(train_y, keys, seed + 11, fraction=val_fraction) if can_hold_out else np.zeros(0, int)
    fit = np.setdiff1d(np.arange(len(rows)), val)  # every class keeps >= 1 image: round(0.1 n) < n
    steps = steps or default_steps(len(rows), batch_size)
    grid = [{"lr": lr, "weight_decay": wd} for lr in lrs for wd in wds]
    if can_hold_out and len(val):
        fit_x, val_x = Features(train_x, rows[fit]), Features(train_x, rows[val])
        fit_x.standardise()
        val_x.standardise(like=fit_x)
        models = train_logreg(fit_x, train_y[fit], n_classes, [g["lr"] for g in grid],
                              [g["weight_decay"] for g in grid], steps, batch_size, seed)
        logits = predict(models, val_x)
        for g, lg in zip(grid, logits):
            g["val_top1"] = topk_accuracy(lg, train_y[val], (1,))[0]
        best = max(grid, key=lambda g: g["val_top1"])  # the first best in grid order on ties
    else:
        best = {"lr": lrs[-1], "weight_decay": wds[-1], "val_top1": None}
    full_x, te_x = Features(train_x, rows), Features(test_x)
    full_x.standardise()
    te_x.standardise(like=full_x)
    final = train_logreg(full_x, train_y, n_classes, [best["lr"]], [best["weight_decay"]], steps, batch_size, seed)
    top1, top5 = topk_accuracy(predict(final, te_x)[0], test_y)
    return {
        "top1": top1, "top5": top5, "lr": best["lr"], "weight_decay": best["weight_decay"],
        "val_top1": best["val_top1"], "grid": grid, "val_split": f"{len(val)} images ({val_fraction:g} of train, "
        f"stratified, seed {seed})" if len(val) else "none (a class has a single image): largest grid values used",
        "steps": steps, "batch_size": min(batch_size, len(rows)), "optimizer": "SGD nesterov 0.9, cosine LR, zero init",
        "standardised": "train mean/std",
    }
