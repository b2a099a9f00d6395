"""Decode + SEER multi-crop throughput on real photographs, against the original SwAV loader.

Images: every distinct 1-20 MP JPEG/PNG under /usr/share/backgrounds and /usr/share/wallpapers
(Debian: ``apt-get install gnome-backgrounds plasma-workspace-wallpapers``), or ``--images DIR``.
Both pipelines turn each source image into SEER's crops (2x160 at scale 0.14-1 + 4x96 at
0.05-0.14, flip, colour jitter p 0.8, grayscale p 0.2, blur p 0.5, normalised float tensors) in a
DataLoader with ``--workers`` processes (default 2), measured in the same run, alternating rounds:

* reference: what the SwAV loader did: PIL full decode, ``convert('RGB')``, then per crop torchvision
  ``RandomResizedCrop`` + flip + colour distortion + ``PILRandomGaussianBlur`` + ToTensor + Normalize;
* openseer: ``load_image(min_pixels=...)`` (reduced-size decode) + ``FastMultiCrop`` (data.fast_decode);
* openseer on shards: the same images packed once by ``openseer shard --max-side 512`` (not timed)
  and streamed back through the training reader (``iterate_batches`` on the shards).

Prints one JSON line: source images per second of each, the speedup, and per-format worker time.

    python bench/data_pipeline.py [--rounds 2] [--workers 2] [--images DIR] [--no-shards]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from openseer.config import build_config
from openseer.data.decode import load_image, reduced_decode_pixels
from openseer.data.multicrop import FastMultiCrop

ROOTS = ("/usr/share/backgrounds", "/usr/share/wallpapers")


def find_images(roots: list[str], lo_mp: float = 1.0, hi_mp: float = 20.0) -> list[tuple[str, str, float]]:
    """(path, format, megapixels) of distinct JPEG/PNG files between lo and hi megapixels; the format
    is 'JPEG', 'JPEG-progressive' or 'PNG'."""
    seen_real, seen_hash, out = set(), set(), []
    for root in roots:
        for dirpath, dirnames, files in os.walk(root):
            dirnames.sort()
            for name in sorted(files):
                if not name.lower().endswith((".jpg", ".jpeg", ".png")):
                    continue
                real = os.path.realpath(os.path.join(dirpath, name))
                if real in seen_real:
                    continue
                seen_real.add(real)
                try:
                    with Image.open(real) as im:
                        fmt, mp = im.format, im.width * im.height / 1e6
                        progressive = bool(im.info.get("progressive") or im.info.get("progression"))
                except Exception:
                    continue
                if fmt not in ("JPEG", "PNG") or not lo_mp <= mp <= hi_mp:
                    continue
                digest = hashlib.sha256(Path(real).read_bytes()).hexdigest()
                if digest not in seen_hash:
                    seen_hash.add(digest)
                    out.append((real, "JPEG-progressive" if progressive else fmt, mp))
    return out


class _PILBlur:
    """SwAV's PILRandomGaussianBlur."""

    def __init__(self, p: float, lo: float, hi: float):
        self.p, self.lo, self.hi = p, lo, hi

    def __call__(self, img):
        if random.random() > self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.lo, self.hi)))


class Reference(Dataset):
    """The original SwAV multi-crop loader (PIL full decode, torchvision transforms per crop)."""

    def __init__(self, paths: list[str], crops):
        self.paths = paths
        self.trans = []
        s = crops.jitter_strength
        for size, n, lo, hi in zip(crops.sizes, crops.counts, crops.min_scale, crops.max_scale):
            t = T.Compose([
                T.RandomResizedCrop(size, scale=(lo, hi)),
                T.RandomHorizontalFlip(p=0.5),
                T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
                T.RandomGrayscale(p=0.2),
                _PILBlur(0.5, 0.1, 2.0),
                T.ToTensor(),
                T.Normalize(mean=crops.mean, std=crops.std),
            ])
            self.trans += [t] * n

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        t0 = time.perf_counter()
        with open(self.paths[i], "rb") as f:
            img = Image.open(f).convert("RGB")
        crops = [t(img) for t in self.trans]
        return i, time.perf_counter() - t0, [c.shape[-1] for c in crops]


class Openseer(Dataset):
    """openseer's path for decoded files: reduced-size decode + FastMultiCrop."""

    def __init__(self, paths: list[str], crops):
        self.paths = paths
        self.mc = FastMultiCrop(crops)
        self.min_pixels = reduced_decode_pixels(crops.sizes, crops.min_scale)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        t0 = time.perf_counter()
        img = load_image(self.paths[i], min_pixels=self.min_pixels)
        crops = self.mc(img, torch.Generator().manual_seed(i))
        return i, time.perf_counter() - t0, [c.shape[-1] for c in crops]


def run_loader(dataset: Dataset, workers: int) -> tuple[float, list[float]]:
    """(images/s of the whole pass, per-image worker seconds by index)."""
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                        prefetch_factor=2 if workers else None)
    per_image = [0.0] * len(dataset)
    t0 = time.perf_counter()
    for i, seconds, sizes in loader:
        per_image[i] = seconds
        assert sizes == [160, 160, 96, 96, 96, 96]
    return len(dataset) / (time.perf_counter() - t0), per_image


def run_shards(paths: list[str], workers: int, crops_overrides: list[str]) -> dict:
    """Pack the images with --max-side 512 (untimed), then stream them through the training reader."""
    from openseer.data.batches import iterate_batches
    from openseer.data.collection import open_collection
    from openseer.data.shards import write_shards

    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "list.txt"
        listing.write_text("\n".join(paths) + "\n")
        t0 = time.perf_counter()
        summary = write_shards(listing, Path(tmp) / "shards", shard_size=max(1, len(paths) // (2 * max(workers, 1))),
                               max_side=512, workers=workers)
        pack_s = time.perf_counter() - t0
        n = summary["total"]
        cfg = build_config("seer-rg32", [*crops_overrides, f"data.num_workers={workers}", "data.batch_size=1",
                                         f"data.epoch_samples={n}"])
        src = open_collection(str(Path(tmp) / "shards"), data_cfg=cfg.data)
        t0 = time.perf_counter()
        count = sum(len(b.keys) for b in iterate_batches(src, cfg, 0, 1, 0, n))
        rate = count / (time.perf_counter() - t0)
    return {"imgs_per_s": round(rate, 2), "pack_s": round(pack_s, 1), "shard_bytes": sum(s["bytes"] for s in summary["shards"])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", action="append", help="folder(s) to search instead of the Debian wallpapers")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of each pipeline (median reported)")
    ap.add_argument("--max-images", type=int, default=0, help="use at most this many images (0 = all)")
    ap.add_argument("--no-shards", action="store_true", help="skip the shard-reader measurement")
    args = ap.parse_args()
    found = find_images(args.images or list(ROOTS))
    if not found:
        print(json.dumps({"bench": "data_pipeline", "error": "no 1-20 MP JPEG/PNG found; install them with "
                          "`apt-get install gnome-backgrounds plasma-workspace-wallpapers` or pass --images DIR"}))
        sys.exit(1)
    if args.max_images:
        found = found[: args.max_images]
    paths = [p for p, _, _ in found]
    crops = build_config("seer-rg32").crops  # SEER: 2x160 (0.14-1) + 4x96 (0.05-0.14)
    t_start = time.perf_counter()
    ref_rates, our_rates, ref_times, our_times = [], [], [], []
    for _ in range(args.rounds):
        rate, per = run_loader(Reference(paths, crops), args.workers)
        ref_rates.append(rate)
        ref_times.append(per)
        rate, per = run_loader(Openseer(paths, crops), args.workers)
        our_rates.append(rate)
        our_times.append(per)
    per_format = {}
    for fmt in ("JPEG", "JPEG-progressive", "PNG"):
        idx = [i for i, (_, f, _) in enumerate(found) if f == fmt]
        if not idx:
            continue
        ref_ms = statistics.median(sum(t[i] for i in idx) / len(idx) for t in ref_times) * 1000
        our_ms = statistics.median(sum(t[i] for i in idx) / len(idx) for t in our_times) * 1000
        per_format[fmt] = {"images": len(idx), "reference_ms_per_image": round(ref_ms, 1),
                           "openseer_ms_per_image": round(our_ms, 1), "speedup": round(ref_ms / our_ms, 2)}
    ref, ours = statistics.median(ref_rates), statistics.median(our_rates)
    row = {
        "bench": "data_pipeline",
        "images": len(paths),
        "formats": {f: sum(1 for _, g, _ in found if g == f) for f in ("JPEG", "JPEG-progressive", "PNG")},
        "megapixels_median": round(statistics.median(mp for _, _, mp in found), 1),
        "crops": "2x160+4x96",
        "workers": args.workers,
        "rounds": args.rounds,
        "reference_imgs_per_s": round(ref, 2),
        "openseer_imgs_per_s": round(ours, 2),
        "speedup": round(ours / ref, 2),
        "per_format": per_format,
    }
    if not args.no_shards:
        shards = run_shards(paths, args.workers, [])
        row["openseer_shards_max_side_512"] = {**shards, "speedup_vs_reference": round(shards["imgs_per_s"] / ref, 2)}
    row.update({"wall_s": round(time.perf_counter() - t_start, 1), "cpus": os.cpu_count(),
                "load_avg_1m": round(os.getloadavg()[0], 2), "torch": torch.__version__,
                "pillow": Image.__version__, "python": platform.python_version()})
    print(json.dumps(row))


if __name__ == "__main__":
    main()
