"""Adapting a trained model to a pile it has not seen: `pretrain --init` against the source as it is and
against pretraining from scratch for the same minutes, on Fashion-MNIST split in two.

    .venv/bin/python bench/adapt.py                      # M=5, source 5 min, 3 seeds: about 50 min (35 of training)
    .venv/bin/python bench/adapt.py --source runs/src    # reuse a source run trained on classes 0-4
    .venv/bin/python bench/adapt.py --epochs 4 --seeds 2 # fixed steps instead of minutes (a busy machine)
    .venv/bin/python bench/adapt.py --quick              # a smoke run: 0.5-min runs, 2 seeds, small eval
    .venv/bin/python bench/adapt.py --sweep --source runs/src   # the adapt recipe's LR/warm-up/freeze sweep

The source pile is Fashion-MNIST's classes 0-4 (T-shirt, trouser, pullover, dress, coat); the target
pile is classes 5-9 (sandal, shirt, sneaker, bag, ankle boot), which the source never saw. Both are
written once under ``--work`` as folders of idx files (what ``--data`` reads as Fashion-MNIST), so
``openseer pretrain`` and ``openseer eval`` take them as they are; the target's labels are never
used in pretraining. The source is tiny-cpu pretrained ``--source-minutes`` on the source pile (or
``--source RUN``). Then, for each seed: (b) ``pretrain --init SOURCE --recipe tiny-cpu-adapt`` on the
target for ``--minutes`` M, and (c) ``pretrain --recipe tiny-cpu`` from scratch on the target for the
same M minutes (``optim.minutes``: the schedule fits the clock, a compile is not counted). Each model,
and (a) the source as it is, is scored by ``openseer eval`` on the target's test split (5,000 images)
with the target's train labels: kNN-20 and the linear probe on all labels, and on the fixed 1% and 10%
subsets (the eval seed is the run's seed). Prints one JSON line: per model and score the mean and
spread (population std) over the seeds, each seed's numbers, and the adapted model's gain over
scratch and over the source. Finished runs and evals under the same ``--work`` are reused.

``--sweep`` measures the settings of ``tiny-cpu-adapt`` instead: continued pretraining from the source
for a fixed number of steps (``--sweep-epochs`` of the target pile: steps, not minutes, so runs on a
shared machine compare fairly; fp32 eager) at each peak LR / warm-up / prototype freezing of
``--sweep-settings``, kNN-20 on the target's test split the score, one seed; plus tiny-cpu from
scratch at the same steps and the source as it is. About 30 minutes on one busy core.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch

from openseer.config import ConfigError, build_config
from openseer.data.collection import load_fashion_mnist
from openseer.data.decode import DataError
from openseer.eval.common import EvalError
from openseer.eval.runner import EvalOptions, evaluate
from openseer.model.backbone import BackboneError
from openseer.train.checkpoint import CheckpointError
from openseer.train.loop import RunError, pretrain

SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
EPOCH_CAP = 1000  # far beyond what any budget here reaches: the clock ends the run
SCORES = ("knn20", "linear", "knn20_1pct", "linear_1pct", "knn20_10pct", "linear_10pct")
SWEEP = "9.6/10/0,4.8/10/0,1.6/10/0,0.48/10/0,4.8/50/50,1.6/50/50"  # tiny-cpu's 4.8 x {2, 1, 1/3, 1/10}; its 50/50
QUIET = ["log.progress=false", "log.tensorboard=false", "checkpoint.every=100000"]


def _write_idx(path: Path, array: np.ndarray) -> None:
    """A uint8 idx file (the format Fashion-MNIST ships in)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_pile(folder: Path, classes: tuple[int, ...]) -> Path:
    """Fashion-MNIST's images of ``classes`` (train and test, labels kept as they are) as idx files."""
    if (folder / "t10k-labels-idx1-ubyte").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = load_fashion_mnist(split)
        keep = np.isin(labels.numpy(), classes)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", images[keep].squeeze(1).numpy())
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels[keep].numpy().astype(np.uint8))
    return folder


def run_pretrain(recipe: str, pile: Path, out: Path, overrides: list[str]) -> dict:
    """One pretraining run (skipped when ``out`` already holds a finished one); its summary."""
    summary_file = out / "bench-summary.json"
    if summary_file.exists():
        return json.loads(summary_file.read_text())
    cfg = build_config(recipe, [*QUIET, *overrides], base={"data": {"source": str(pile)}})
    t = time.perf_counter()
    summary = pretrain(cfg, out)
    doc = {"steps": summary["step"], "train_s": summary["counters"].get("train_seconds"),
           "wall_s": round(time.perf_counter() - t, 1), "recipe": recipe, "overrides": overrides}
    summary_file.write_text(json.dumps(doc))
    return doc


def scores(weights: str, target: Path, seed: int, protocols: tuple[str, ...], out: Path, limit_train: int = 0,
           limit_test: int = 0) -> dict:
    """openseer eval's kNN-20 / linear on all labels and the 1% / 10% subsets of the target (an eval
    report already at ``out`` is read instead: a bench run that stopped goes on where it was)."""
    if out.is_file():
        doc = json.loads(out.read_text())
    else:
        doc = evaluate(EvalOptions(weights=weights, data=str(target), out=str(out), protocols=protocols, seed=seed,
                                   ks=(20,), lowshot_protocols=("knn", "linear"), limit_train=limit_train,
                                   limit_test=limit_test, progress=False, no_cache=True,
                                   command="bench/adapt.py " + " ".join(sys.argv[1:])))
    got = {}
    for r in doc["results"]:
        if r["model"] != "this":
            continue
        name = {"knn": "knn20", "linear": "linear"}[r["protocol"]]
        if r["protocol"] == "knn" and r.get("k") != 20:
            continue
        got[name if r["split"] == "full" else f"{name}_{r['split']}"] = r["top1"]
    return got


def _mean_spread(rows: list[dict]) -> dict:
    out = {}
    for key in SCORES:
        vals = [r[key] for r in rows if r.get(key) is not None]
        if vals:
            out[key] = {"mean": round(float(np.mean(vals)), 2), "std": round(float(np.std(vals)), 2)}
    return out


def sweep(args: argparse.Namespace, source: str, target: Path, work: Path) -> dict:
    """kNN-20 on the target after a fixed step count, for each adapt setting; scratch; the source."""
    steps = [f"optim.epochs={args.sweep_epochs:g}", "model.compile=false", "optim.precision=fp32", "seed=0",
             *([f"threads={args.threads}"] if args.threads else [])]
    settings = [(float(lr), int(wu), int(fr)) for lr, wu, fr in (x.split("/") for x in args.sweep_settings.split(","))]
    rows = [{"name": "source as it is",
             **scores(source, target, 0, ("knn",), work / "sweep-source-eval.json")}]
    print(f"bench: {rows[-1]}", file=sys.stderr, flush=True)
    plan = [("scratch", "tiny-cpu", [])] + [
        (f"lr{lr:g}-wu{wu}-fr{fr}", "tiny-cpu",
         [f"model.init={source}", f"optim.base_lr={lr:g}", f"optim.warmup_steps={wu}", f"swav.freeze_prototypes_steps={fr}"])
        for lr, wu, fr in settings]
    for name, recipe, extra in plan:
        out = work / f"sweep-{name}"
        t = time.perf_counter()
        run = run_pretrain(recipe, target, out, [*steps, *extra])
        row = {"name": name, "steps": run["steps"], "train_s": run["train_s"],
               **scores(str(out), target, 0, ("knn",), out / "eval.json")}
        row["wall_s"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        print(f"bench: {row}", file=sys.stderr, flush=True)
    return {"bench": "adapt-sweep", "source": source, "epochs": args.sweep_epochs, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0, help="M: minutes of (b) adapting and (c) scratch, each")
    p.add_argument("--source-minutes", type=float, default=5.0, help="minutes of the source's pretraining")
    p.add_argument("--epochs", type=float, default=0.0,
                   help="a fixed budget instead of the clock: every pretraining run (source, adapted, scratch) "
                        "trains this many epochs of its pile (4 = about 5 idle minutes of tiny-cpu on 2 cores); "
                        "fair on a busy machine, where minutes are not")
    p.add_argument("--source", help="a source run (or weights) pretrained on classes 0-4 to reuse")
    p.add_argument("--seeds", type=int, default=3, help="pretraining and eval seeds for (b) and (c)")
    p.add_argument("--work", default="runs/bench-adapt", help="piles and runs (a finished run is reused)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="smoke run: runs of at most 0.5 minutes, at most 2 seeds, eval on 3000 train / 1000 test images")
    p.add_argument("--sweep", action="store_true", help="the adapt settings sweep instead (see above)")
    p.add_argument("--sweep-epochs", type=float, default=0.5, help="sweep runs' length in target epochs")
    p.add_argument("--sweep-settings", default=SWEEP,
                   help=f"sweep: LR/WARMUP/FREEZE triples, comma-separated (peak LR per 256 images, warm-up steps, "
                        f"prototype freezing steps; default {SWEEP})")
    args = p.parse_args(argv)
    if args.quick:
        args.minutes, args.source_minutes = min(args.minutes, 0.5), min(args.source_minutes, 0.5)
        args.seeds = min(args.seeds, 2)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    limits = (3000, 1000) if args.quick else (0, 0)

    def budget(minutes: float) -> list[str]:
        """The clock (``optim.minutes``), or a fixed number of epochs with ``--epochs``."""
        if args.epochs:
            return [f"optim.epochs={args.epochs:g}", "optim.minutes=0", "model.compile=false"]
        return [f"optim.minutes={minutes:g}", f"optim.epochs={EPOCH_CAP}"]

    threads = [f"threads={args.threads}"] if args.threads else []
    work = Path(args.work)
    t0 = time.perf_counter()
    try:
        source_pile = write_pile(work / "source-pile", SOURCE_CLASSES)
        target = write_pile(work / "target-pile", TARGET_CLASSES)
        source = args.source
        source_run = None
        if source is None:
            source = str(work / "source")
            source_run = run_pretrain("tiny-cpu", source_pile, Path(source), [*threads, *budget(args.source_minutes)])
        if args.sweep:
            print(json.dumps({**sweep(args, source, target, work), "total_s": round(time.perf_counter() - t0, 1)}))
            return 0
        protocols = ("knn", "linear", "lowshot")
        models: dict[str, list[dict]] = {"source": [], "adapted": [], "scratch": []}
        runs: dict[str, list[dict]] = {"adapted": [], "scratch": []}
        clock = [*threads, *budget(args.minutes)]
        for seed in range(args.seeds):
            models["source"].append(scores(source, target, seed, protocols, work / f"source-eval-{seed}.json", *limits))
            for name, recipe, extra in (("adapted", "tiny-cpu-adapt", [f"model.init={source}"]),
                                        ("scratch", "tiny-cpu", [])):
                out = work / (f"{name}-{args.epochs:g}ep-seed{seed}" if args.epochs else f"{name}-{args.minutes:g}m-seed{seed}")
                runs[name].append(run_pretrain(recipe, target, out, [*clock, f"seed={seed}", *extra]))
                models[name].append(scores(str(out), target, seed, protocols, out / "eval.json", *limits))
            print(f"bench: seed {seed}: {json.dumps({k: v[-1] for k, v in models.items()})}", file=sys.stderr, flush=True)
    except (ConfigError, DataError, EvalError, RunError, CheckpointError, BackboneError) as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    summary = {k: _mean_spread(v) for k, v in models.items()}
    line = {"bench": "adapt", "minutes": None if args.epochs else args.minutes, "epochs": args.epochs or None, "source": source, "source_run": source_run,
            "seeds": args.seeds, "quick": args.quick, "eval_limits": list(limits),
            **{f"gain_vs_{ref}": {k: round(summary["adapted"][k]["mean"] - summary[ref][k]["mean"], 2)
                                   for k in SCORES if k in summary["adapted"] and k in summary[ref]}
               for ref in ("scratch", "source")},
            "summary": summary, "per_seed": models,
            "steps": {k: [r["steps"] for r in v] for k, v in runs.items()},
            "total_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
