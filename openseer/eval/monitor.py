"""A quick kNN monitor for pretraining: is the backbone learning anything useful yet?

``knn_monitor(backbone, cfg, device)`` embeds ``cfg.monitor.n_train`` labelled train images and
``cfg.monitor.n_test`` test images of ``cfg.monitor.data`` with the eval transform of the run's
config, and scores weighted kNN (k = ``cfg.monitor.k``, T = 0.07). The chosen images (a seeded
stratified subset, the same at every call) are prepared once per process and kept in memory when
small; the backbone's train/eval mode is restored afterwards. No feature cache: weights change.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from ..config import Config, channel_stats
from .common import EvalError, EvalTransform, LabelledData, load_batch, open_labelled
from .knn import TEMPERATURE, knn_eval

KEEP_BYTES = 256 << 20  # prepared images kept in memory between calls up to this size
_prepared: dict[tuple, tuple[LabelledData, list[torch.Tensor | None]]] = {}


def _prepare(cfg: Config, transform: EvalTransform) -> tuple[LabelledData, list[torch.Tensor | None]]:
    m = cfg.monitor
    key = (m.data, m.n_train, m.n_test, cfg.seed, transform)
    if key not in _prepared:
        data = open_labelled(m.data, seed=cfg.seed, limit_train=m.n_train, limit_test=m.n_test)
        images: list[torch.Tensor | None] = [None, None]
        if (len(data.train) + len(data.test)) * 3 * transform.crop ** 2 <= KEEP_BYTES:
            images = [_as_uint8(load_batch(s, np.arange(len(s)), transform)) for s in (data.train, data.test)]
        _prepared.clear()
        _prepared[key] = (data, images)
    return _prepared[key]


def _as_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.mul(255).round_().to(torch.uint8)


@torch.inference_mode()
def _embed(backbone: nn.Module, data, images: torch.Tensor | None, transform: EvalTransform,
           device: torch.device, batch_size: int = 256) -> torch.Tensor:
    out = []
    for a in range(0, len(data), batch_size):
        idx = np.arange(a, min(len(data), a + batch_size))
        x = images[a:a + batch_size].float().div_(255) if images is not None else load_batch(data, idx, transform)
        x = transform.normalize(x.to(device)).contiguous(memory_format=torch.channels_last)
        out.append(backbone(x).float().cpu())
    return torch.cat(out)


def knn_monitor(backbone: nn.Module, cfg: Config, device: str | torch.device) -> dict:
    """{"knn_top1", "knn_top5", "knn_k", "monitor_s"} on the monitor's labelled subset (a few seconds)."""
    m = cfg.monitor
    if not m.data:
        raise EvalError("the kNN monitor needs labelled data: set monitor.data (e.g. monitor.data=fashion-mnist)")
    t0 = time.perf_counter()
    device = torch.device(device)
    transform = EvalTransform(cfg.crops.sizes[0], tuple(channel_stats(cfg.crops.mean, cfg.model.in_chans)),
                              tuple(channel_stats(cfg.crops.std, cfg.model.in_chans)))
    data, images = _prepare(cfg, transform)
    was_training = backbone.training
    backbone.eval()
    try:
        ftr = _embed(backbone, data.train, images[0], transform, device)
        fte = _embed(backbone, data.test, images[1], transform, device)
    finally:
        backbone.train(was_training)
    r = knn_eval(ftr, data.train.labels, fte, data.test.labels, data.n_classes, (m.k,), TEMPERATURE, device)[0]
    return {"knn_top1": r["top1"], "knn_top5": r["top5"], "knn_k": m.k, "monitor_s": round(time.perf_counter() - t0, 3)}
