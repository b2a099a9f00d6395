"""Evaluation commands: ``eval`` (kNN, linear probes, low-shot, baselines) and ``report`` (a run's page).

Thin: parse, call the package (openseer/eval/, openseer/use/run_report.py), print. The parser
imports no torch: the defaults it shows are repeated here and pinned to the eval modules' own by
tests/test_commands.py.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..config import ConfigError
from .options import add_device, add_parser, add_threads, device, missing, set_threads

# as the eval modules define them (runner.PROTOCOLS, runner.LOWSHOT_PROTOCOLS, knn.DEFAULT_KS,
# knn.TEMPERATURE, lowshot.FinetuneSettings, labelbudget.DRAWS), without importing torch
PROTOCOLS = ("knn", "linear", "lowshot", "baselines", "fewlabels")
LOWSHOT_PROTOCOLS = ("knn", "linear", "finetune")
DEFAULT_KS = (10, 20, 100, 200)
TEMPERATURE = 0.07
LABEL_DRAWS = 5
FINETUNE = {"batch_size": 64, "lr_backbone": 0.2, "lr_head": 5.0, "lr_scratch": 0.2, "min_scale": 1.0}

EVAL_EXAMPLES = """examples:
  openseer eval runs/a --data fashion-mnist --out runs/a/eval.json      # every protocol, default splits
  openseer eval runs/a --data /path/labelled --protocols knn,linear,lowshot
  openseer eval --backbone regnetx_002 --random-init --data fashion-mnist  # the floor
  openseer eval model.safetensors --backbone regnety_002 --data labels.csv --skip-missing
  openseer eval runs/a --data ~/photos   # ~100 labelled photos: k beyond them skipped, 95% intervals shown
  openseer eval runs/a --layer s3+s4 --protocols knn,linear --out runs/a/eval-s3s4.json  # two stages
  openseer eval runs/a --protocols fewlabels --label-budget 50   # 50 labels chosen by select vs random
  openseer eval runs/a --data /path/labelled --leakage           # which eval images are in the run's pile
  openseer eval runs/a --data /path/labelled --leakage exclude   # numbers without the test images it saw

labelled data: 'fashion-mnist'; a folder with one subfolder per class (with train/ and val/
subfolders, or a seeded stratified split); or a CSV of path,label[,split].
"""


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"values must be positive, got {text!r}")
    return values


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if any(not 0 < v <= 100 for v in values):
        raise argparse.ArgumentTypeError(f"percentages must be in (0, 100], got {text!r}")
    return values


def _protocols(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in values if v not in PROTOCOLS]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"unknown protocol(s) {', '.join(map(repr, bad)) or repr(text)}; "
                                         f"choose from {','.join(PROTOCOLS)}")
    return values


def _lowshot_protocols(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in values if v not in LOWSHOT_PROTOCOLS]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"unknown low-shot protocol(s) {', '.join(map(repr, bad)) or repr(text)}; "
                                         f"choose from {','.join(LOWSHOT_PROTOCOLS)}")
    return values


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "eval", "evaluate weights: kNN, linear probe, low-shot fine-tune, baselines", EVAL_EXAMPLES,
                   description="Evaluate a backbone on labelled data with the protocols of the SEER paper "
                               "(kNN, linear probes, low-shot fine-tuning; docs/guide.md) and the baselines; "
                               "writes eval.json and eval.md and prints the table.")
    p.add_argument("weights", nargs="?", metavar="WEIGHTS",
                   help="a run directory, a checkpoint (.pt), an exported backbone (.safetensors or .pt state "
                        "dict), or a timm model name")
    p.add_argument("--backbone", metavar="NAME", help="timm architecture (required for files that do not say it)")
    p.add_argument("--random-init", action="store_true",
                   help="evaluate the architecture with random weights (zero_init_last=False): the floor")
    p.add_argument("--data", default="fashion-mnist", help="labelled data (default fashion-mnist)")
    p.add_argument("--out", help="report path (default RUN/eval.json, or eval-NAME/eval.json)")
    p.add_argument("--protocols", type=_protocols, default=PROTOCOLS, metavar="LIST",
                   help=f"comma-separated subset of {','.join(PROTOCOLS)} (default all)")
    p.add_argument("--seed", type=int, default=0, help="seed of every split and training (default 0)")
    p.add_argument("--cache-dir", help="feature cache (default $OPENSEER_CACHE or ~/.cache/openseer/features)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write cached features")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    p.add_argument("--skip-missing", action="store_true",
                   help="skip (and list) the files a CSV names that do not exist, instead of stopping "
                        "(deny-listed and undecodable images are always skipped, and counted by reason)")
    p.add_argument("--k", type=_ints, default=DEFAULT_KS, metavar="LIST", dest="ks",
                   help=f"kNN neighbour counts (default {','.join(map(str, DEFAULT_KS))})")
    p.add_argument("--temperature", type=float, default=TEMPERATURE, help=f"kNN temperature (default {TEMPERATURE})")
    p.add_argument("--layer", default="last", metavar="STAGES",
                   help="features for kNN and the linear probes: 'last' (default: the pooled last stage), a "
                        "stage as timm names it (RegNet s1..s4, ResNet layer1..layer4), or stages joined by "
                        "'+', e.g. s3+s4 (each pooled, L2-normalised, concatenated); fine-tunes use the whole net")
    p.add_argument("--lowshot", type=_floats, default=(1.0, 10.0), metavar="PCTS",
                   help="low-shot percentages of the train labels (default 1,10)")
    p.add_argument("--lowshot-protocols", type=_lowshot_protocols, default=LOWSHOT_PROTOCOLS, metavar="LIST",
                   help=f"what runs on each low-shot subset: a subset of {','.join(LOWSHOT_PROTOCOLS)} (default all; "
                        "without finetune the supervised-from-scratch baseline is skipped too)")
    p.add_argument("--per-class", type=_ints, default=(), metavar="LIST",
                   help="also low-shot subsets of N images per class, e.g. 5,10")
    p.add_argument("--label-budget", type=int, default=100, metavar="N",
                   help="fewlabels: N train labels chosen by `openseer select`'s rule against N random ones (and "
                        "raw pixels with N random), each fitted as `openseer finetune` would (default 100)")
    p.add_argument("--label-draws", type=int, default=LABEL_DRAWS, metavar="D",
                   help=f"fewlabels: random draws of N labels, reported as mean and spread (default {LABEL_DRAWS})")
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="fine-tune epochs per subset (default: about --finetune-images images seen)")
    p.add_argument("--finetune-images", type=int, default=60000,
                   help="auto budget: images seen per fine-tune, at most 50 epochs (default 60000, ~2 min per "
                        "fine-tune for the tiny-cpu backbone on 2 cores)")
    p.add_argument("--finetune-batch-size", type=int, default=FINETUNE["batch_size"])
    p.add_argument("--finetune-lr", type=float, default=FINETUNE["lr_backbone"], help=f"backbone LR (default {FINETUNE['lr_backbone']})")
    p.add_argument("--finetune-head-lr", type=float, default=FINETUNE["lr_head"], help=f"new head's LR (default {FINETUNE['lr_head']})")
    p.add_argument("--scratch-lr", type=float, default=FINETUNE["lr_scratch"],
                   help=f"backbone LR of the supervised-from-scratch baseline (default {FINETUNE['lr_scratch']})")
    p.add_argument("--finetune-min-scale", type=float, default=FINETUNE["min_scale"],
                   help=f"fine-tune random resized crop scale min..1 (default {FINETUNE['min_scale']:g}: whole image, flips only)")
    p.add_argument("--limit-train", type=int, default=0, help="use a seeded stratified subset of N train images")
    p.add_argument("--limit-test", type=int, default=0, help="use a seeded stratified subset of N test images")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="test share when a folder or CSV has no split of its own (default 0.2)")
    p.add_argument("--recipe", help="take crop size and mean/std from this recipe (default: the weights' config)")
    p.add_argument("--crop-size", type=int, default=0, help="override the eval crop size")
    p.add_argument("--leakage", nargs="?", const="report", choices=("report", "exclude"), default="",
                   help="test-set leakage audit: search the run's pretraining pile (its data.source, through the "
                        "pile's index, built when missing) for a near copy of every train and test image, list "
                        "them in eval-leakage.csv beside eval.json and count them in the report; 'exclude' also "
                        "leaves the leaked test images out of the numbers")
    p.add_argument("--pile", default="", metavar="PILE",
                   help="the pretraining pile the leakage audit searches (default: the run's data.source)")
    add_device(p)
    add_threads(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars or stage messages")
    p.set_defaults(func=cmd_eval)


def _command_line() -> str:
    """The command as typed, when run as ``openseer`` (empty when called from Python)."""
    if Path(sys.argv[0]).name not in ("openseer", "__main__.py"):
        return ""
    return " ".join(shlex.quote(a) for a in ["openseer", *sys.argv[1:]])


def cmd_eval(args: argparse.Namespace) -> int:
    """Run the evaluation and print the markdown table."""
    if not args.weights and not args.backbone:
        raise ConfigError("give the weights to evaluate (a run dir, checkpoint, exported file or timm name) "
                        "or --backbone NAME")
    if args.label_budget < 2 or args.label_draws < 1:
        raise ConfigError("--label-budget must be >= 2 and --label-draws >= 1")
    if args.batch_size < 1 or args.finetune_batch_size < 2:
        raise ConfigError("--batch-size must be >= 1 and --finetune-batch-size >= 2")
    if not 0 < args.finetune_min_scale <= 1:
        raise ConfigError(f"--finetune-min-scale must be in (0, 1], got {args.finetune_min_scale:g}")
    if args.pile and not args.leakage:
        raise ConfigError("--pile is the pile the leakage audit searches: give it with --leakage")
    if missing(args.data):
        from ..data.decode import DataError

        raise DataError(f"labelled data {args.data!r} does not exist (give 'fashion-mnist', a folder with one "
                        f"subfolder per class, or a CSV of path,label)")
    from ..eval.lowshot import FinetuneSettings
    from ..eval.report import render_markdown
    from ..eval.runner import EvalOptions, evaluate

    settings = FinetuneSettings(batch_size=args.finetune_batch_size, lr_backbone=args.finetune_lr,
                                lr_head=args.finetune_head_lr, lr_scratch=args.scratch_lr,
                                min_scale=args.finetune_min_scale)
    opts = EvalOptions(
        weights=args.weights, backbone=args.backbone, random_init=args.random_init, data=args.data, out=args.out,
        protocols=args.protocols, seed=args.seed, cache_dir=args.cache_dir, no_cache=args.no_cache,
        batch_size=args.batch_size, skip_missing=args.skip_missing, ks=args.ks, temperature=args.temperature,
        layer=args.layer, percents=args.lowshot, lowshot_protocols=args.lowshot_protocols,
        per_class=args.per_class, label_budget=args.label_budget, label_draws=args.label_draws,
        finetune_epochs=args.finetune_epochs,
        finetune_images=args.finetune_images, finetune=settings, limit_train=args.limit_train,
        limit_test=args.limit_test, test_fraction=args.test_fraction, recipe=args.recipe, crop_size=args.crop_size,
        device=args.device, threads=args.threads, progress=not args.quiet,
        command=_command_line(), leakage=args.leakage, pile=args.pile,
    )
    doc = evaluate(opts)
    print(render_markdown(doc))
    print(f"\nopenseer: wrote {doc['written']['json']} and {doc['written']['markdown']}")
    return 0


REPORT_EXAMPLES = """examples:
  openseer report runs/a                           # runs/a/report.html
  openseer report runs/a --data /pile --sample 5000 --map tsne
  openseer report runs/a --summary                 # also print the run, its eval table, the page's path
"""


def add_report(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "report", "write RUN_DIR/report.html: curves, eval table, clusters, neighbours, map",
                   REPORT_EXAMPLES, description="One self-contained HTML page (images embedded) about a run.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", help="default RUN_DIR/report.html")
    p.add_argument("--data", help="images to show the model (default: the run's training data)")
    p.add_argument("--sample", type=int, default=2000, help="images in the sample (default 2000)")
    p.add_argument("--prototypes", type=int, default=8, help="most-used prototypes shown (default 8)")
    p.add_argument("--per-prototype", type=int, default=10, help="images per prototype (default 10)")
    p.add_argument("--queries", type=int, default=6, help="nearest-neighbour queries (default 6)")
    p.add_argument("--neighbours", type=int, default=9, help="neighbours per query (default 9)")
    p.add_argument("--map", default="pca", choices=["pca", "tsne"], dest="map_method",
                   help="2-D map: pca (default) or tsne (needs scikit-learn)")
    p.add_argument("--seed", type=int, default=0)
    add_device(p)
    add_threads(p)
    p.add_argument("--summary", action="store_true",
                   help="end with a short summary: the run, its evaluation table, the report's path")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    if not Path(args.run_dir).expanduser().is_dir():
        from ..data.decode import DataError

        raise DataError(f"{Path(args.run_dir).expanduser()} is not a directory (give a run directory from "
                        f"`openseer pretrain`)")
    from ..use.run_report import write_report

    set_threads(args.threads)
    r = write_report(args.run_dir, args.out, data=args.data, sample=args.sample, prototypes=args.prototypes,
                     per_prototype=args.per_prototype, queries=args.queries, neighbours=args.neighbours,
                     map_method=args.map_method, seed=args.seed, device=device(args.device))
    for note in r["notes"]:
        print(f"openseer: note: {note}", file=sys.stderr)
    print(f"openseer: report written in {r['seconds']:.1f} s: {r['path']}")
    if args.summary:
        from ..use.run_report import run_summary

        print(run_summary(args.run_dir, r["path"]))
    return 0


