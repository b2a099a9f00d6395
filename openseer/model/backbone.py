"""The trunk: any timm model by name (pooled features out), including SEER's RegNetYs.

SEER's architectures are timm's ``regnety_320/640/1280/2560`` (SEER.md §2). Large ones can be
built on the meta device (no memory) for planning. ``channels_last`` is applied where it is
faster (convnets on CPU and GPU).
"""

from __future__ import annotations

import timm
import torch
from torch import nn

SEER_ARCHS = {
    "regnety_320": "RG-32GF",
    "regnety_640": "RG-64GF",
    "regnety_1280": "RG-128GF",
    "regnety_2560": "RG-256GF",
}


class BackboneError(ValueError):
    """An unknown or unusable backbone name."""


def build_backbone(arch: str, zero_init_last: bool = True, device: str | torch.device = "cpu") -> nn.Module:
    """``timm.create_model(arch, num_classes=0)``: an nn.Module mapping images to pooled features.

    ``zero_init_last=False`` switches off timm's zero-init of each residual block's last norm, which
    otherwise makes a randomly initialised network's features nearly constant.
    """
    if arch not in timm.list_models():
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:10]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise BackboneError(f"unknown backbone {arch!r} (any timm model name works){hint}")
    kwargs = {"num_classes": 0, "pretrained": False}
    with torch.device(device):
        try:
            model = timm.create_model(arch, zero_init_last=zero_init_last, **kwargs)
        except TypeError:
            model = timm.create_model(arch, **kwargs)
    return model


def feature_dim(backbone: nn.Module) -> int:
    """Width of the pooled features."""
    return int(backbone.num_features)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
