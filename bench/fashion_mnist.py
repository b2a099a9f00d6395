"""Fashion-MNIST benchmark: pretrain tiny-cpu for M minutes (labels unused), then every protocol.

    .venv/bin/python bench/fashion_mnist.py --minutes 30
    .venv/bin/python bench/fashion_mnist.py --minutes 15 model.arch=regnety_002   # a recipe change

Pretraining runs under a wall-clock budget (``optim.minutes=M``): the LR cosine follows the share of
the budget spent and the run stops when it is spent, so it uses the M minutes whatever the machine's
speed that day (``optim.epochs`` is raised so the clock, not the epoch count, ends the run). Then
``openseer eval`` runs every protocol and baseline on Fashion-MNIST's own train/test split. Prints
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from openseer.config import ConfigError, build_config
from openseer.data.decode import DataError
from openseer.eval.common import EvalError
from openseer.eval.runner import PROTOCOLS, EvalOptions, evaluate
from openseer.model.backbone import BackboneError
from openseer.train.checkpoint import CheckpointError
from openseer.train.loop import RunError, pretrain

EPOCH_CAP = 1000  # far beyond what any budget here reaches: the clock ends the run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, required=True, help="pretraining budget in minutes")
    p.add_argument("--out", help="run directory (default runs/bench-fashion-mnist-<M>m)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="pretraining seed (the evaluation's splits stay seed 0)")
    p.add_argument("--protocols", default=",".join(PROTOCOLS), help="eval protocols (default all)")
    p.add_argument("--limit-train", type=int, default=0, help="eval on a subset of the train labels (quick checks)")
    p.add_argument("--limit-test", type=int, default=0, help="eval on a subset of the test images (quick checks)")
    p.add_argument("--finetune-epochs", type=int, default=0, help="fine-tune epochs (default: eval's auto budget)")
    p.add_argument("--cache-dir", help="feature cache folder for the eval")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="recipe overrides for the pretraining, e.g. model.arch=regnety_002 (recorded in the JSON)")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = Path(args.out or f"runs/bench-fashion-mnist-{args.minutes:g}m")
    if (out / "config.yaml").exists():
        print(f"bench: {out} already holds a run; pass --out NEW_DIR", file=sys.stderr)
        return 2
    base = ["log.progress=false", "log.tensorboard=false"] + ([f"threads={args.threads}"] if args.threads else [])
    try:
        t0 = time.perf_counter()
        overrides = [*base, f"optim.minutes={args.minutes:g}", f"optim.epochs={EPOCH_CAP}", "checkpoint.every=100000",
                     f"seed={args.seed}", *args.overrides]
        cfg = build_config("tiny-cpu", overrides, base={"data": {"source": "fashion-mnist"}})
        t1 = time.perf_counter()
        summary = pretrain(cfg, out)
        pretrain_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        doc = evaluate(EvalOptions(weights=str(out), data="fashion-mnist", out=str(out / "eval.json"),
                                   protocols=tuple(args.protocols.split(",")), limit_train=args.limit_train,
                                   limit_test=args.limit_test, finetune_epochs=args.finetune_epochs,
                                   cache_dir=args.cache_dir, progress=False,
                                   command="bench/fashion_mnist.py " + " ".join(sys.argv[1:])))
        eval_s = time.perf_counter() - t2
    except (ConfigError, DataError, EvalError, RunError, CheckpointError, BackboneError) as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])

    def top1(model: str, protocol: str, split: str, k: int | None = None) -> float | None:
        for r in doc["results"]:
            if (r["model"], r["protocol"], r["split"]) == (model, protocol, split) and r.get("k", k) == k:
                return r["top1"]
        return None

    line = {
        "bench": "fashion_mnist", "minutes": args.minutes, "steps": summary["step"],
        "epochs": round(summary["counters"]["images_seen"] / 60000, 3),
        "train_s": summary["counters"].get("train_seconds"), "final_loss": round(final["loss"], 4), "pretrain_s": round(pretrain_s, 1),
        "eval_s": round(eval_s, 1), "total_s": round(time.perf_counter() - t0, 1),
        "knn20": top1("this", "knn", "full", 20), "linear": top1("this", "linear", "full"),
        "knn20_1pct": top1("this", "knn", "1pct", 20), "linear_1pct": top1("this", "linear", "1pct"),
        "knn20_10pct": top1("this", "knn", "10pct", 20), "linear_10pct": top1("this", "linear", "10pct"),
        "finetune_1pct": top1("this", "finetune", "1pct"), "finetune_10pct": top1("this", "finetune", "10pct"),
        "random_knn20": top1("random_init", "knn", "full", 20), "random_linear": top1("random_init", "linear", "full"),
        "pixels_knn20": top1("pixels", "knn", "full", 20), "pixels_linear": top1("pixels", "linear", "full"),
        "scratch_1pct": top1("scratch", "finetune", "1pct"), "scratch_10pct": top1("scratch", "finetune", "10pct"),
        "overrides": overrides, "report": doc["written"]["json"],
    }
    for split in ("1pct", "10pct"):  # the low-shot figure: the best protocol on each subset
        vals = [line[f"{p}_{split}"] for p in ("knn20", "linear", "finetune") if line[f"{p}_{split}"] is not None]
        line[f"best_{split}"] = max(vals) if vals else None
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
