"""How close the SwAV training step gets to the hardware, against a typical implementation.

For each configuration prints one JSON line: source images/s of the whole training step (data
included), the split between data wait, forward, Sinkhorn, backward and optimiser step, and model
FLOP utilisation = FLOPs of one forward+backward (counted with torch.utils.flop_counter) divided by
the measured forward+backward time, over the matmul peak measured in the same run (large square
fp32 and bf16 matmuls).

Configurations:
  tiny     the tiny-cpu recipe on Fashion-MNIST (openseer's real training loop)
  tiny-baseline   the same backbone, crops and batch trained the way a typical SwAV code does it:
           default memory layout, fp32, eager, each crop through the trunk separately, per-image PIL
           augmentation in a plain DataLoader with 2 workers
  rg32     regnety_320 at SEER's crops (2x160 + 4x96), small batch, synthetic images, bf16 +
           channels_last (model step only: data is not the question for a big model)

    python bench/train_step.py [--configs tiny,tiny-baseline,rg32] [--steps N] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 8) -> float:
    """FLOP/s of large square matmuls (best of a few runs)."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


def count_flops(model, crops: list[torch.Tensor], amp_dtype=None) -> int:
    """FLOPs of one forward + backward of the SwAV model on these crops."""
    with FlopCounterMode(display=False) as counter:
        with torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
            z, scores = model(crops)
        scores.float().logsumexp(1).mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _split(rows: list[dict]) -> dict:
    keys = ("data", "forward", "sinkhorn", "backward", "optimizer")
    return {k: round(sum(r[f"{k}_s"] for r in rows) / len(rows), 4) for k in keys}


def bench_tiny(steps: int, overrides: list[str]) -> dict:
    """openseer's own loop (tiny-cpu recipe), timings from its metrics."""
    from openseer.config import build_config
    from openseer.model.swav import build_swav
    from openseer.train.loop import pretrain

    interval = max(steps // 4, 1)
    cfg = build_config("tiny-cpu", ["log.progress=false", "log.tensorboard=false", f"log.every={interval}",
                                    "checkpoint.every=1000000000", *overrides])
    with tempfile.TemporaryDirectory() as tmp:
        pretrain(cfg, Path(tmp) / "run", max_steps=steps)
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = rows[1:] or rows
    step_s = sum(r["step_s"] for r in rows) / len(rows)
    split = _split(rows)
    model = build_swav(cfg)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    crops = [torch.randn(cfg.data.batch_size, 3, s, s) for s, n in zip(cfg.crops.sizes, cfg.crops.counts)
             for _ in range(n)]
    amp = torch.bfloat16 if cfg.optim.precision == "bf16" else None
    flops = count_flops(model, crops, amp)
    model_s = split["forward"] + split["backward"]
    return {"config": "tiny", "arch": cfg.model.arch, "batch": cfg.data.batch_size, "overrides": overrides,
            "imgs_per_s": round(cfg.data.batch_size / step_s, 1), "step_s": round(step_s, 4), "split_s": split,
            "flops_per_step": flops, "model_flops_per_s": flops / model_s,
            "precision": cfg.optim.precision, "channels_last": cfg.model.channels_last}


class _PILCrops(torch.utils.data.Dataset):
    """Per-image PIL augmentation, the way the original SwAV loader does it."""

    def __init__(self, images: torch.Tensor, cfg):
        from torchvision import transforms as T

        self.images = images
        s = cfg.crops.jitter_strength
        self.trans = []
        for size, count, lo, hi in zip(cfg.crops.sizes, cfg.crops.counts, cfg.crops.min_scale, cfg.crops.max_scale):
            t = T.Compose([
                T.RandomResizedCrop(size, scale=(lo, hi)),
                T.RandomHorizontalFlip(),
                T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=cfg.crops.jitter_p),
                T.RandomGrayscale(p=cfg.crops.grayscale_p),
                T.ToTensor(),
                T.Normalize(cfg.crops.mean, cfg.crops.std),
            ])
            self.trans += [t] * count

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        img = Image.fromarray(self.images[i, 0].numpy(), mode="L").convert("RGB")
        return [t(img) for t in self.trans]


def bench_tiny_baseline(steps: int) -> dict:
    """A typical SwAV loop: per-image PIL crops, 2 workers, each crop through the trunk separately."""
    from openseer.config import build_config
    from openseer.data.sources import load_fashion_mnist
    from openseer.model.swav import SwAVLoss, build_swav
    from openseer.train.optim import build_optimizer

    cfg = build_config("tiny-cpu", ["model.channels_last=false"])
    images, _ = load_fashion_mnist("train")
    loader = torch.utils.data.DataLoader(_PILCrops(images, cfg), batch_size=cfg.data.batch_size, shuffle=True,
                                         num_workers=2, drop_last=True)
    torch.manual_seed(0)
    model = build_swav(cfg)
    opt = build_optimizer(model, cfg)
    loss_fn = SwAVLoss(cfg.n_crops, cfg.swav.crops_for_assign, cfg.swav.temperature, cfg.swav.epsilon,
                       cfg.swav.sinkhorn_iters)
    for g in opt.param_groups:
        g["lr"] = 0.1
    t = {"data": 0.0, "forward": 0.0, "sinkhorn": 0.0, "backward": 0.0, "optimizer": 0.0}
    it = iter(loader)
    warm = 2
    for step in range(steps + warm):
        if step == warm:
            t = dict.fromkeys(t, 0.0)
            start = time.perf_counter()
        t0 = time.perf_counter()
        crops = next(it)
        t1 = time.perf_counter()
        model.prototypes.normalize_()
        feats = torch.cat([model.backbone(c) for c in crops])  # one trunk pass per crop
        z = torch.nn.functional.normalize(model.head(feats), dim=1)
        scores = model.prototypes(z)
        t2 = time.perf_counter()
        targets = loss_fn.targets(z, scores, model.prototypes.weight, step)
        t3 = time.perf_counter()
        loss = loss_fn(scores, targets)
        opt.zero_grad()
        loss.backward()
        t4 = time.perf_counter()
        opt.step()
        t5 = time.perf_counter()
        for k, a, b in (("data", t0, t1), ("forward", t1, t2), ("sinkhorn", t2, t3), ("backward", t3, t4),
                        ("optimizer", t4, t5)):
            t[k] += b - a
    wall = time.perf_counter() - start
    crops = [torch.randn(cfg.data.batch_size, 3, s, s) for s, n in zip(cfg.crops.sizes, cfg.crops.counts)
             for _ in range(n)]
    flops = count_flops(model, crops)
    split = {k: round(v / steps, 4) for k, v in t.items()}
    return {"config": "tiny-baseline", "arch": cfg.model.arch, "batch": cfg.data.batch_size,
            "imgs_per_s": round(cfg.data.batch_size * steps / wall, 1), "step_s": round(wall / steps, 4),
            "split_s": split, "flops_per_step": flops,
            "model_flops_per_s": flops / (split["forward"] + split["backward"]),
            "precision": "fp32", "channels_last": False}


def bench_big(arch: str, steps: int, batch: int, bf16: bool, channels_last: bool) -> dict:
    """Model step of a SEER RegNetY at 2x160 + 4x96 with synthetic images."""
    from openseer.config import build_config
    from openseer.model.swav import SwAVLoss, build_swav
    from openseer.train.optim import build_optimizer

    cfg = build_config("seer-rg32", [f"model.arch={arch}", f"model.channels_last={str(channels_last).lower()}",
                                     "model.head_hidden=[2048]", "swav.n_prototypes=3000"])
    model = build_swav(cfg)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg)
    for g in opt.param_groups:
        g["lr"] = 0.1
    loss_fn = SwAVLoss(cfg.n_crops, [0, 1], 0.1, 0.05, 3)
    crops = [torch.randn(batch, 3, s, s) for s, n in zip(cfg.crops.sizes, cfg.crops.counts) for _ in range(n)]
    amp = torch.bfloat16 if bf16 else None
    times = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            z, scores = model(crops)
        loss = loss_fn(scores, loss_fn.targets(z, scores, model.prototypes.weight, step))
        opt.zero_grad()
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        if step:
            times.append(t1 - t0)
    model_s = sum(times) / len(times)
    flops = count_flops(model, crops, amp)
    return {"config": "rg32" if arch == "regnety_320" else arch, "arch": arch, "batch": batch,
            "imgs_per_s": round(batch / model_s, 2), "model_s": round(model_s, 3), "flops_per_step": flops,
            "model_flops_per_s": flops / model_s, "precision": "bf16" if bf16 else "fp32",
            "channels_last": channels_last}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="tiny,tiny-baseline,rg32")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--big-steps", type=int, default=3)
    ap.add_argument("--big-batch", type=int, default=4)
    ap.add_argument("--smoke", action="store_true", help="a few steps of everything (for the test suite)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for the tiny config")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.big_steps, args.big_batch = 4, 1, 1
    peaks = {"fp32": matmul_peak(torch.float32, 512 if args.smoke else 2048),
             "bf16": matmul_peak(torch.bfloat16, 512 if args.smoke else 2048)}
    results = []
    for name in args.configs.split(","):
        if name == "tiny":
            r = bench_tiny(args.steps, args.overrides + (["data.limit=2048", "data.batch_size=64"] if args.smoke else []))
        elif name == "tiny-baseline":
            r = bench_tiny_baseline(args.steps)
        elif name == "rg32":
            r = bench_big("regnety_320" if not args.smoke else "regnety_002", args.big_steps, args.big_batch,
                          bf16=True, channels_last=True)
        else:
            raise SystemExit(f"unknown config {name!r}")
        r["bench"] = "train_step"
        r["peak_fp32_flops"] = peaks["fp32"]
        r["peak_bf16_flops"] = peaks["bf16"]
        r["util_fp32"] = round(r["model_flops_per_s"] / peaks["fp32"], 3)
        r["util_bf16"] = round(r["model_flops_per_s"] / peaks["bf16"], 3)
        r["threads"] = torch.get_num_threads()
        r["machine"] = f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}"
        results.append(r)
        print(json.dumps(r), flush=True)
    by = {r["config"]: r for r in results}
    if "tiny" in by and "tiny-baseline" in by:
        print(json.dumps({"bench": "train_step", "speedup_tiny_vs_baseline":
                          round(by["tiny"]["imgs_per_s"] / by["tiny-baseline"]["imgs_per_s"], 2)}))


if __name__ == "__main__":
    main()
