"""Throughput of SwAV pretraining with a recipe (default tiny-cpu on Fashion-MNIST).

Prints one JSON line: source images/s of the whole training step (data included) and the split of
a step between data wait, forward, Sinkhorn, backward and the optimiser step, averaged over the
logged intervals after the first (warm-up) one.

    python bench/pretrain_throughput.py [--recipe tiny-cpu] [--steps 60] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from openseer.config import build_config
from openseer.train.loop import pretrain


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="tiny-cpu")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--interval", type=int, default=10, help="steps per measured interval")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = build_config(args.recipe, [
        "log.progress=false", "log.tensorboard=false", f"log.every={args.interval}",
        f"checkpoint.every={10**9}", *args.overrides,
    ], base={"data": {"source": args.data}})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        pretrain(cfg, Path(tmp) / "run", max_steps=args.steps)
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = rows[1:] if len(rows) > 1 else rows
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    step_s = mean("step_s")
    print(json.dumps({
        "bench": "pretrain_throughput",
        "recipe": args.recipe,
        "overrides": args.overrides,
        "arch": cfg.model.arch,
        "crops": [f"{n}x{s}" for n, s in zip(cfg.crops.counts, cfg.crops.sizes)],
        "global_batch": cfg.data.batch_size,
        "steps_measured": len(rows) * args.interval,
        "imgs_per_s": round(cfg.data.batch_size / step_s, 1),
        "step_s": round(step_s, 4),
        "split_s": {k: round(mean(f"{k}_s"), 4) for k in ("data", "forward", "sinkhorn", "backward", "optimizer")},
        "final_loss": rows[-1]["loss"],
        "wall_s": round(wall, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
    }))


if __name__ == "__main__":
    main()
