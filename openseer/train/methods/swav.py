"""SwAV pretraining as a method of the one loop: the SwAV model, its queue, and ``SwAVMethod``
(model/swav.py, which owns the forward, Sinkhorn targets, loss, backward and the queue's state)."""

from __future__ import annotations

import torch
from torch import nn

from ...config import Config
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

    def describe(self) -> str:
        return ""

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


__all__ = ["SwAVMethod", "SwAVTraining"]
