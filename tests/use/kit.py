"""Helpers for the "use the features" tests: a tiny run directory and a folder of images."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from openseer.config import build_config, save_config, to_dict
from openseer.model.swav import build_swav
from openseer.train.checkpoint import save_checkpoint
from tests.conftest import write_pngs

# timm's own stem (stride 2), so exported files load into plain timm unchanged; 24-px crops (tiny-cpu)
TINY = ["model.head_hidden=[64]", "swav.n_prototypes=16", "model.zero_init_last=false", "model.stem_stride=0"]


def make_run(run_dir: Path, arch: str = "regnety_002", seed: int = 0, metrics: int = 0,
             overrides: tuple[str, ...] = ()) -> Path:
    """A run directory with one checkpoint in the training format (random SwAV weights, non-trivial
    features) and, when ``metrics``, that many lines of metrics.jsonl."""
    cfg = build_config("tiny-cpu", [*TINY, f"model.arch={arch}", *overrides])
    torch.manual_seed(seed)
    model = build_swav(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    state = {"format": "openseer.pretrain.v1", "step": 3, "model": model.state_dict(), "config": to_dict(cfg)}
    save_checkpoint(state, run_dir, 3, keep=1)
    if metrics:
        with open(run_dir / "metrics.jsonl", "w") as f:
            for i in range(1, metrics + 1):
                f.write(json.dumps({"step": 10 * i, "loss": 5.7 - 0.05 * i, "lr": 0.01 * i, "imgs_per_s": 200 + i,
                                    "prototypes_used": 5 + i, "assign_entropy": 1.0, "ln_k": 2.77}) + "\n")
    return run_dir


def image_folder(root: Path, n: int = 12) -> Path:
    """``n`` small PNGs at the top, 3 larger ones in a subfolder."""
    write_pngs(root, n)
    write_pngs(root / "sub", 3, prefix="big", size=(90, 60))
    return root
