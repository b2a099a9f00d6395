"""The trunk: any timm model by name (pooled features out), including SEER's RegNetYs.

SEER's architectures are timm's ``regnety_320/640/1280/2560`` (SEER.md §2) and the 2022 RegNet-10B,
which timm lacks: ``seer_regnet_10b`` is built here from its pycls numbers with timm's ``RegNetCfg``
and registered with timm, so ``timm.create_model('seer_regnet_10b')`` works once openseer is
imported. Large ones can be built on the meta device (no memory) for planning. ``channels_last`` is applied where it is
faster (convnets on CPU and GPU).
"""

from __future__ import annotations

import timm
import torch
from timm.models import register_model
from timm.models.regnet import RegNet, RegNetCfg
from torch import nn

SEER_ARCHS = {
    "regnety_320": "RG-32GF",
    "regnety_640": "RG-64GF",
    "regnety_1280": "RG-128GF",
    "regnety_2560": "RG-256GF",
    "seer_regnet_10b": "RG-10B",
}

# SEER 2022 RegNet-10B (SEER.md §2): depth 27, w0 1744, wa 620.83, wm 2.52, group width 1010, SE 0.25,
# stem 32 -> stage widths 2020, 4040, 11110, 28280, depths 2, 7, 17, 1; 9.32B trunk parameters.
SEER_10B_CFG = RegNetCfg(depth=27, w0=1744, wa=620.83, wm=2.52, group_size=1010, bottle_ratio=1.0,
                         se_ratio=0.25, stem_width=32)


def _regnet_from_cfg(cfg: RegNetCfg, kwargs: dict) -> RegNet:
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only"):
        if kwargs.pop(key, None) and key == "features_only":
            raise BackboneError("features_only is not supported for seer_regnet_10b")
    return RegNet(cfg, **kwargs)


if "seer_regnet_10b" not in timm.list_models():

    @register_model
    def seer_regnet_10b(pretrained: bool = False, **kwargs) -> RegNet:
        """SEER's RegNet-10B trunk (random init; no published timm weights)."""
        if pretrained:
            raise BackboneError("seer_regnet_10b has no pretrained weights in timm")
        return _regnet_from_cfg(SEER_10B_CFG, kwargs)


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
