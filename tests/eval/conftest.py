"""Shared fixtures for the evaluation tests: a tiny checkpoint and small labelled image folders.

(tests/conftest.py already runs torch on one thread and provides the Fashion-MNIST skip marker.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from openseer.config import build_config, save_config, to_dict
from openseer.model.swav import build_swav
from openseer.train.checkpoint import save_checkpoint

TINY = ["model.head_hidden=[64]", "swav.n_prototypes=16"]


def make_run(run_dir: Path, arch: str = "regnety_002", seed: int = 0) -> Path:
    """A run directory holding one checkpoint in the training format (random SwAV weights)."""
    cfg = build_config("tiny-cpu", [*TINY, f"model.arch={arch}"])
    torch.manual_seed(seed)
    model = build_swav(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    state = {"format": "openseer.pretrain.v1", "step": 3, "model": model.state_dict(), "config": to_dict(cfg)}
    return save_checkpoint(state, run_dir, 3, keep=1)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("tiny") / "run"
    make_run(run)
    return run


def write_class_folders(root: Path, counts: dict[str, int], size: int = 20, seed: int = 0) -> Path:
    """PNG images in one subfolder per class; each class has its own brightness, so it is learnable."""
    rng = np.random.default_rng(seed)
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            base = 40 + 160 * c / max(1, len(counts) - 1)
            arr = np.clip(base + rng.normal(0, 10, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i:03d}.png")
    return root
