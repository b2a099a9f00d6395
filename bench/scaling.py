"""Weak scaling on this machine: images/s per process with 1 and 2 CPU processes (gloo).

Each process keeps the same per-process batch (``--batch-per-proc``), so the global batch grows with
the world size; with perfect scaling the images/s per process would not change. Every process gets
``--threads`` intra-op threads. Runs real ``openseer pretrain`` (torchrun for 2 processes) and reads
the steps' time from metrics.jsonl, dropping the first logged interval (warm-up). Prints one JSON line:

    python bench/scaling.py [--steps 12] [--batch-per-proc 32] [--strategy ddp|fsdp] [key=value ...]

``efficiency`` = (images/s per process with 2) / (images/s with 1). On a machine with 2 cores shared
with other work it measures the communication and synchronisation overhead, not a cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, args, tmp: Path) -> dict:
    out = tmp / f"run{world}"
    gb = args.batch_per_proc * world
    interval = max(1, args.steps // 3)
    pretrain = ["-m", "openseer", "pretrain", "--data", args.data, "--out", str(out), "--max-steps", str(args.steps),
                f"data.batch_size={gb}", f"data.limit={gb * (args.steps + 1)}", "optim.epochs=1",
                f"threads={args.threads}", f"log.every={interval}", "log.progress=false", "log.tensorboard=false",
                f"checkpoint.every={10**9}", f"dist.strategy={args.strategy}", *args.overrides]
    if world == 1:
        cmd = [sys.executable, *pretrain]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
               "--master_port", str(_port()), *pretrain]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"world {world} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = rows[1:] if len(rows) > 1 else rows
    step_s = sum(r["step_s"] for r in rows) / len(rows)
    return {"global_batch": gb, "step_s": round(step_s, 4), "imgs_per_s": round(gb / step_s, 1),
            "imgs_per_s_per_proc": round(gb / step_s / world, 1), "wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-per-proc", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    ap.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"])
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("overrides", nargs="*", help="config overrides for both runs (tiny-cpu recipe)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, args, Path(tmp))
        two = run(2, args, Path(tmp))
    print(json.dumps({
        "bench": "scaling",
        "strategy": args.strategy,
        "recipe": "tiny-cpu",
        "overrides": args.overrides,
        "batch_per_proc": args.batch_per_proc,
        "threads_per_proc": args.threads,
        "steps": args.steps,
        "procs_1": one,
        "procs_2": two,
        "efficiency": round(two["imgs_per_s_per_proc"] / one["imgs_per_s_per_proc"], 3),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
