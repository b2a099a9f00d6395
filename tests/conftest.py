"""Shared fixtures: a Fashion-MNIST skip marker, a tiny fast config, folders of generated images."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from openseer.config import Config, build_config
from openseer.data.collection import FASHION_MNIST_DIR

# The test models are tiny: one intra-op thread is as fast on an idle machine and many times faster
# on a busy one (OpenMP threads spin-waiting for a core). OPENSEER_TEST_THREADS=N overrides.
torch.set_num_threads(int(os.environ.get("OPENSEER_TEST_THREADS", "1")))


def _fmnist_dir() -> Path:
    return Path(os.environ.get("OPENSEER_FASHION_MNIST", FASHION_MNIST_DIR))


def fashion_mnist_present() -> bool:
    folder = _fmnist_dir()
    return any((folder / f"train-images-idx3-ubyte{ext}").is_file() for ext in ("", ".gz"))


# use as a decorator or in ``pytestmark``: tests that need the real Fashion-MNIST files
fmnist_available = pytest.mark.skipif(
    not fashion_mnist_present(),
    reason=f"Fashion-MNIST not found in {_fmnist_dir()} (apt-get install dataset-fashion-mnist)",
)

# Settings every test run uses: no progress bar, no TensorBoard writer.
QUIET = ["log.progress=false", "log.tensorboard=false"]

# Test runs train in fp32 eager: the tiny-cpu recipe's auto picks bf16 + torch.compile where the
# machine does them fast, and a first compile costs a minute or two per process on a fresh machine.
# tests/train/test_hardware.py runs the auto path for real.
EAGER_FP32 = ["optim.precision=fp32", "model.compile=false"]

# A pretraining set-up small enough for a few seconds on 2 CPU cores: timm's tiny test ResNet,
# 2x24 + 2x12 crops, 30 prototypes, a short freeze and warmup. The math is the real one; only the
# sizes are small.
FAST = [
    *QUIET,
    "model.arch=test_resnet",
    "model.head_hidden=[64]",
    "model.head_out=32",
    "crops.sizes=[24,12]",
    "crops.counts=[2,2]",
    "model.stem_stride=0",
    "swav.n_prototypes=30",
    "swav.freeze_prototypes_steps=4",
    "optim.warmup_steps=4",
    "data.num_workers=0",
    *EAGER_FP32,
]


def tiny_config(*overrides: str, recipe: str = "tiny-cpu") -> Config:
    """The tiny-cpu recipe with the FAST settings and then ``overrides`` applied, validated."""
    return build_config(recipe, [*FAST, *overrides])


@pytest.fixture
def make_config():
    """``make_config('data.batch_size=64', ...)`` -> a validated tiny Config."""
    return tiny_config


def png_bytes(seed: int, size: tuple[int, int] = (20, 16), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    img = Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode=mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_pngs(folder: Path, n: int, prefix: str = "img", size: tuple[int, int] = (20, 16)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{prefix}{i:03d}.png"
        p.write_bytes(png_bytes(i, size))
        paths.append(p)
    return paths


@pytest.fixture
def png_folder(tmp_path: Path) -> Path:
    """A folder of 16 small random RGB PNGs."""
    folder = tmp_path / "pngs"
    write_pngs(folder, 16)
    return folder


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` with its bytes and modification time (to prove nothing changed)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}
