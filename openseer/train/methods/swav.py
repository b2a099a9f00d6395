"""SwAV pretraining as a method of the one loop: the SwAV model, its queue, and ``SwAVMethod``
(model/swav.py, which owns the forward, Sinkhorn targets, loss, backward and the queue's state).

A new run with ``model.init`` (``pretrain --init``) starts from those weights (``start_from``, before
DDP/FSDP wrap the model; model/init.py): the backbone, the head and prototypes when the source has
them, else prototypes from k-means of the pile's projected features. A resumed run does not: its
checkpoint holds the weights."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from ...config import Config
from ...data.batches import iterate_batches
from ...data.collection import Collection
from ...model.init import (
    check_hash,
    describe_init,
    init_record,
    kmeans_prototypes,
    kmeans_sample_size,
    load_init,
    read_init,
)
from ...model.swav import SwAVMethod, SwAVQueue, build_swav
from ...rundir import RunError
from ..distributed import DistEnv


class SwAVTraining:
    """Builds SwAV pretraining for ``openseer pretrain`` (see train/methods/__init__.py)."""

    name = "pretrain"

    def __init__(self, cfg: Config, env: DistEnv, device: torch.device):
        if cfg.swav.queue_length > 0 and cfg.swav.queue_length % env.world_size:
            raise RunError(f"swav.queue_length={cfg.swav.queue_length} must be divisible by the world size "
                           f"{env.world_size}")
        self.cfg, self.env, self.device = cfg, env, device
        self.init_record: dict | None = None

    def describe(self) -> str:
        return describe_init(self.init_record) if self.init_record else ""

    def start_from(self, model: nn.Module, source: Collection) -> None:
        """``model.init``: load the starting weights into ``model`` and, where the source has no
        prototypes, set them to k-means centroids of the projected features of the first steps' global
        crops (a seeded sample of ``source``). Records what was done in the config (``model.init_*``,
        saved to config.yaml) and in ``init_record`` (RUN_DIR/init.json)."""
        cfg = self.cfg
        if not cfg.model.init:
            return
        src = read_init(cfg.model.init)
        sha = check_hash(cfg, src)
        result = load_init(model, src, cfg)
        if "prototypes" in result["fresh"]:
            with torch.random.fork_rng(devices=[]):  # the run's own randomness is not consumed
                done = kmeans_prototypes(model, _global_crops(source, cfg), cfg, self.device)
            result["fresh"]["prototypes"] += (f": spherical k-means of {done['features']} projected features of the "
                                              f"pile (faiss, seed {done['seed']})")
        cfg.model.init_sha256 = sha
        cfg.model.init_loaded = list(result["loaded"])
        cfg.model.init_fresh = list(result["fresh"])
        self.init_record = init_record(src, sha, result)

    def build_model(self) -> nn.Module:
        model = build_swav(self.cfg).to(self.device)
        if self.cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def build_method(self, model: nn.Module, autocast) -> SwAVMethod:
        cfg, queue = self.cfg, None
        if cfg.swav.queue_length > 0:
            queue = SwAVQueue(len(cfg.swav.crops_for_assign), cfg.swav.queue_length // self.env.world_size,
                              cfg.model.head_out).to(self.device)
        return SwAVMethod(model, cfg, queue, autocast)


def _global_crops(source: Collection, cfg: Config) -> Iterator[list[torch.Tensor]]:
    """The crops that get Sinkhorn targets (``swav.crops_for_assign``) of the run's first steps, as one
    process sees them: enough batches for ``kmeans_sample_size`` features (read lazily, on rank 0 only)."""
    assign = list(cfg.swav.crops_for_assign)
    steps = math.ceil(kmeans_sample_size(cfg) / (cfg.data.batch_size * len(assign)))
    batches = iterate_batches(source, cfg, 0, 1, 0, steps)
    try:
        for batch in batches:
            yield [batch.crops[i] for i in assign]
    finally:
        if hasattr(batches, "close"):
            batches.close()


__all__ = ["SwAVMethod", "SwAVTraining"]
