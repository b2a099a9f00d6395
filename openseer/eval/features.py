"""Pooled features, extracted once per (weights, data, transform) and cached as memory-mapped .npy.

Every protocol (kNN, linear probe, low-shot kNN/linear) reads the same cached array, so a model is
run over a data set once. The cache key is a hash of the weights hash, the data fingerprint and
the transform id; files are written to a temporary name and renamed, so an interrupted run never
leaves a half-written cache entry. Default folder: ``~/.cache/openseer/features``, or
``$OPENSEER_CACHE``, or ``--cache-dir``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..progress import progress as progress_bar
from .common import EvalError, EvalTransform, Labelled, load_batch, warn

FEATURE_LAYER = "pooled (timm forward with num_classes=0: global average pool of the last stage)"


def cache_dir(path: str | Path | None = None) -> Path:
    """``path``, else ``$OPENSEER_CACHE``, else ``~/.cache/openseer/features``."""
    if path:
        return Path(path).expanduser()
    env = os.environ.get("OPENSEER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "openseer" / "features"


def cache_key(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def cached(parts: list[str], compute: Callable[[], tuple[np.ndarray, list]], folder: Path | None,
           meta: dict | None = None) -> tuple[np.ndarray, list, bool]:
    """(array, bad items, hit) for a cache key made of ``parts``; computed and saved on a miss.

    ``folder=None`` disables the cache. The array comes back memory-mapped (read-only) on a hit.
    """
    if folder is None:
        arr, bad = compute()
        return arr, bad, False
    key = cache_key(*parts)
    npy, side = folder / f"{key}.npy", folder / f"{key}.json"
    if npy.is_file() and side.is_file():
        try:
            info = json.loads(side.read_text())
            return np.load(npy, mmap_mode="r"), [tuple(b) for b in info.get("bad", [])], True
        except (OSError, ValueError, json.JSONDecodeError):
            warn(f"feature cache entry {npy} is unreadable; recomputing")
    arr, bad = compute()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = npy.with_name(f"{key}.{os.getpid()}.tmp.npy")
        np.save(tmp, np.ascontiguousarray(arr))
        os.replace(tmp, npy)
        side.write_text(json.dumps({"parts": parts, "shape": list(arr.shape), "bad": bad,
                                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **(meta or {})}, indent=1))
    except OSError as e:
        warn(f"could not write the feature cache in {folder} ({e.strerror or e}); continuing without it")
        return arr, bad, False
    return np.load(npy, mmap_mode="r"), bad, False


def _batches(n: int, batch_size: int, desc: str, progress: bool):
    with progress_bar(desc, total=n, unit="img", enabled=progress, leave=False) as bar:
        for start in range(0, n, batch_size):
            idx = np.arange(start, min(n, start + batch_size))
            yield idx
            bar.update(len(idx))


def extract_features(model: nn.Module, data: Labelled, transform: EvalTransform, batch_size: int = 256,
                     device: str | torch.device = "cpu", progress: bool = True,
                     desc: str = "features") -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Pooled features (N, D) float32 in data order, and the undecodable images (index, reason)."""
    device = torch.device(device)
    model = model.to(device).eval().to(memory_format=torch.channels_last)
    out: np.ndarray | None = None
    bad: list[tuple[int, str]] = []
    with torch.inference_mode():
        for idx in _batches(len(data), batch_size, desc, progress):
            x = transform.normalize(load_batch(data, idx, transform, bad=bad).to(device, non_blocking=True))
            f = model(x.contiguous(memory_format=torch.channels_last))
            if f.ndim != 2:
                raise EvalError(f"the backbone returned features of shape {tuple(f.shape)}; expected pooled (B, D)")
            if out is None:
                out = np.zeros((len(data), f.shape[1]), dtype=np.float32)
            out[idx] = f.float().cpu().numpy()
    assert out is not None
    return out, bad


def backbone_features(model: nn.Module, weights: str, data: Labelled, transform: EvalTransform,
                      folder: Path | None, batch_size: int = 256, device: str | torch.device = "cpu",
                      progress: bool = True, desc: str = "features",
                      layer: str = FEATURE_LAYER) -> tuple[np.ndarray, list, bool]:
    """Cached ``extract_features``, keyed by (weights hash, data fingerprint, transform id, layer)."""
    parts = [f"weights={weights}", f"data={data.fingerprint()}", f"transform={transform.ident()}",
             f"layer={layer}"]
    return cached(parts, lambda: extract_features(model, data, transform, batch_size, device, progress, desc),
                  folder, {"kind": "backbone"})


def pixel_features(data: Labelled, size: int, folder: Path | None, progress: bool = True,
                   batch_size: int = 1024) -> tuple[np.ndarray, list, bool]:
    """Raw pixels in [0, 1] at ``size`` x ``size`` (the eval geometry), one channel for grayscale data."""
    gray = data.images is not None and data.images.shape[1] == 1
    plain = EvalTransform(size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

    def compute() -> tuple[np.ndarray, list]:
        out = np.zeros((len(data), (1 if gray else 3) * size * size), dtype=np.float32)
        bad: list[tuple[int, str]] = []
        for idx in _batches(len(data), batch_size, "pixels", progress):
            x = load_batch(data, idx, plain, bad=bad)
            if gray:
                x = x[:, :1]
            out[idx] = x.flatten(1).numpy()
        return out, bad

    parts = [f"pixels={size}", f"gray={gray}", f"data={data.fingerprint()}", "transform=pixels-v1"]
    return cached(parts, compute, folder, {"kind": "pixels"})
