"""Baselines that put a number in context, evaluated with the same protocols and splits:

* random init: the same architecture with fresh weights (``zero_init_last=False``: timm's default
  zero-init of each block's last norm would make random features nearly constant) - the floor;
* raw pixels: kNN and logistic regression on the images themselves;
* supervised from scratch: the same architecture trained on the same labelled subset with the same
  budget as the fine-tune (``lowshot.finetune`` with no pretrained weights).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..model.backbone import set_stem_stride
from ..model.load import load_backbone
from .common import EvalTransform, Labelled
from .features import pixel_features
from .lowshot import FinetuneSettings, finetune

PIXELS_SIZE = 28


def random_init(arch: str, seed: int = 0, stem_stride: int = 0) -> tuple[nn.Module, dict]:
    """The floor: ``arch`` (with the evaluated model's stem stride) with seeded random weights,
    ``zero_init_last=False``."""
    model, info = load_backbone(None, arch=arch, random_init=True, seed=seed)
    if stem_stride:
        set_stem_stride(model, stem_stride)
        info["stem_stride"] = stem_stride
    return model, info


def pixels(train: Labelled, test: Labelled, folder: Path | None, size: int = PIXELS_SIZE,
           progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Raw-pixel 'features' (train, test): the image at ``size`` x ``size``, one channel if grayscale."""
    return (pixel_features(train, size, folder, progress)[0], pixel_features(test, size, folder, progress)[0])


def supervised_scratch(arch: str, train: Labelled, test: Labelled, transform: EvalTransform,
                       n_classes: int, settings: FinetuneSettings, seed: int = 0,
                       device: str | torch.device = "cpu", progress: bool = True, desc: str = "scratch",
                       stem_stride: int = 0) -> dict:
    """Train ``arch`` from random weights on the labelled subset with the fine-tune's budget."""
    return finetune(None, arch, train, test, transform, n_classes, settings, seed, device, progress, desc,
                    stem_stride=stem_stride)
