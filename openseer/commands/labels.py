"""Label commands: ``select`` (which images of a pile to label first), ``finetune`` (a classifier from
those labels) and ``predict`` (its classes for a folder).

Thin: parse, call the package (openseer/use/select.py, finetune.py, predict.py), print; the heavy
modules are imported inside the functions.
"""

from __future__ import annotations

import argparse
import sys

from .options import add_device, add_parser, add_threads, check_pile, device, set_threads

SELECT_EXAMPLES = """examples:
  openseer select /pile --model runs/a --budget 100 --out to-label/     # the 100 images most worth labelling
  openseer select /pile --model runs/a --budget 50 --out next/ --labelled labels.csv   # 50 more, elsewhere
then label to-label/to_label.csv (fill its label column) or sort the files into one folder per class.
output: to_label.csv (path,label + why: cluster, its size, typicality), to_label.html (a contact sheet),
        select.json, embed/ (the embeddings, reused when run again)
"""


def add_select(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "select", "choose which images of a pile to label: typical and diverse, no near-copies",
                   SELECT_EXAMPLES,
                   description="Embed the pile, keep one image per near-duplicate group, cluster into as many "
                               "clusters as labelled images there will be, and pick the most typical image of "
                               "each of the largest clusters no labelled image covers (TypiClust).")
    p.add_argument("pile", metavar="PILE", help="a folder of images, a .txt list of paths, tar shards or fashion-mnist")
    p.add_argument("--model", required=True, metavar="WEIGHTS",
                   help="the backbone to embed with: a run directory, checkpoint, exported file or timm name")
    p.add_argument("--budget", required=True, type=int, metavar="N", help="how many images to choose")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--labelled", metavar="CSV|FOLDER",
                   help="images already labelled (a CSV of path,label or class folders): the next N go elsewhere")
    p.add_argument("--dup-by", default="descriptor", choices=["descriptor", "embedding", "none"],
                   help="how near-copies are found (as curate; default: the near-copy descriptor)")
    p.add_argument("--dup-threshold", type=float, default=0.95, help="cosine that makes two images copies (0.95)")
    p.add_argument("--layer", default="last", metavar="STAGES", help="features to embed with (as `openseer embed`)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="decoding processes (default 0: in-process)")
    add_device(p)
    add_threads(p)
    p.add_argument("--quiet", action="store_true", help="no progress")
    p.set_defaults(func=cmd_select)


def cmd_select(args: argparse.Namespace) -> int:
    """Choose the images most worth labelling and write the list and contact sheet."""
    check_pile(args.pile)
    from ..use.select import select

    set_threads(args.threads)
    r = select(args.pile, args.out, args.model, args.budget, labelled=args.labelled or "", dup_by=args.dup_by,
               dup_threshold=args.dup_threshold, seed=args.seed, batch_size=args.batch_size, workers=args.workers,
               device=device(args.device), layer=args.layer, progress=not args.quiet,
               log=(lambda t: None) if args.quiet else print)
    print(f"openseer: {r['chosen']} images to label from {r['decoded']} ({r['bad']} bad, "
          f"{r['duplicates_left_out']} near-copies left out) -> {r['files']['to_label.csv']}; "
          f"contact sheet {r['files']['to_label.html']}")
    if r.get("note"):
        print(f"openseer: note: {r['note']}", file=sys.stderr)
    return 0


FINETUNE_EXAMPLES = """examples:
  openseer finetune runs/a --data labels.csv --out clf/                   # CSV of path,label
  openseer finetune runs/a --data labelled/ --pile /pile --out clf/       # class folders; spread over the pile
  openseer finetune runs/a --data labelled/ --out clf/ --full yes --minutes 30   # always fine-tune the backbone
  openseer finetune runs/a --data labelled/ --out clf/ --resume           # continue a stopped fine-tune
  openseer predict clf/ --data /new-images --out preds.csv
output: clf/classifier.safetensors (backbone + head + class names), clf/finetune.json (every protocol's
        cross-validated estimate with a 95% interval, raw pixels' on the same labels, and the full
        fine-tune's held-out trial); when the fine-tune is kept clf/ is also its run directory
        (config.yaml, metrics.jsonl, checkpoints/), the trial's run is clf/trial/
"""


def add_finetune(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "finetune", "a classifier from a handful of labels, chosen by cross-validation",
                   FINETUNE_EXAMPLES,
                   description="Embed the labelled images, cross-validate kNN, linear heads and (with --pile) "
                               "label spreading on the labels alone, fit the best on all of them, and write "
                               "backbone + head + class names. A full fine-tune (backbone + head, from the "
                               "chosen linear probe) is tried on a held-out fold of the labels and kept only "
                               "when it beats the frozen protocol there.")
    p.add_argument("weights", metavar="WEIGHTS", help="a run directory, checkpoint, exported file or timm name")
    p.add_argument("--data", required=True, metavar="LABELLED",
                   help="a CSV of path,label, a folder of class folders, or fashion-mnist")
    p.add_argument("--out", required=True, help="output folder (the classifier)")
    p.add_argument("--pile", metavar="PILE", help="the unlabelled pile (folder, list or shards): label spreading uses it")
    p.add_argument("--layer", default="last", metavar="STAGES", help="features to classify ('last', 's3', 's3+s4')")
    p.add_argument("--limit-train", type=int, default=0, metavar="N", help="a seeded stratified subset of N labels")
    p.add_argument("--skip-missing", action="store_true", help="skip CSV rows whose file does not exist")
    p.add_argument("--cache-dir", help="feature cache (default $OPENSEER_CACHE or ~/.cache/openseer/features)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="decoding processes for --pile and fine-tuning (default 0)")
    p.add_argument("--full", default="auto", choices=["auto", "yes", "no"],
                   help="full fine-tune of backbone + head: auto (tried when a held-out fold fits, kept if it "
                        "wins there), yes (always), no (frozen features only)")
    p.add_argument("--minutes", type=float, default=10.0,
                   help="time budget of the full fine-tune, trial and final run together (default 10; 0: none)")
    p.add_argument("--epochs", type=float, default=0.0, help="full fine-tune length in epochs (default: ~200 steps)")
    p.add_argument("--resume", action="store_true", help="continue the fine-tune runs already in --out")
    add_device(p)
    add_threads(p)
    p.add_argument("--quiet", action="store_true", help="no progress")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides of the fine-tune runs, e.g. optim.base_lr=0.5 checkpoint.every=20")
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args: argparse.Namespace) -> int:
    """Choose, fit and write a few-label classifier; print the choice against raw pixels."""
    check_pile(args.pile)
    from ..use.finetune import finetune, summary_lines

    set_threads(args.threads)
    r = finetune(args.weights, args.data, args.out, pile=args.pile or "", layer=args.layer, seed=args.seed,
                 limit_train=args.limit_train, skip_missing=args.skip_missing, device=device(args.device),
                 batch_size=args.batch_size, workers=args.workers, cache=args.cache_dir, progress=not args.quiet,
                 log=(lambda t: None) if args.quiet else print, full=args.full, minutes=args.minutes,
                 epochs=args.epochs, resume=args.resume, overrides=tuple(args.overrides))
    for line in summary_lines(r):
        print(f"openseer: {line}")
    if r["bad"]:
        print(f"openseer: skipped {r['bad']} unreadable labelled images ({r['bad_by_reason']})", file=sys.stderr)
    print(f"openseer: classifier -> {r['files']['classifier']} ({len(r['classes'])} classes); "
          f"report {r['files']['report']}")
    return 0


PREDICT_EXAMPLES = """examples:
  openseer predict clf/ --data /new-images --out preds.csv               # top-5 classes per image
  openseer predict clf/ --data 'shards/{000000..000009}.tar' --out preds.csv --top 1
  torchrun --nproc_per_node 4 -m openseer predict clf/ --data /pile --out preds.csv --device cuda  # 4 ranks
  (interrupted? run the same command again: the embedded chunks in preds.csv.parts/ are kept)
output: preds.csv (path, key, class1, prob1, ...), preds.bad.csv (skipped files and why)
"""


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "predict", "a classifier's top classes for every image of a folder, list or shards",
                   PREDICT_EXAMPLES)
    p.add_argument("classifier", metavar="CLF", help="a classifier folder (openseer finetune --out) or its file")
    p.add_argument("--data", required=True, metavar="IMAGES", help="a folder of images, a .txt list or tar shards")
    p.add_argument("--out", required=True, help="the predictions, a .csv file")
    p.add_argument("--top", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=4096,
                   help="images per resumable chunk, the unit ranks share (default 4096; tar shards: one per shard)")
    p.add_argument("--workers", type=int, default=0, help="decoding processes (default 0: in-process)")
    add_device(p)
    add_threads(p)
    p.add_argument("--quiet", action="store_true", help="no progress")
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    """Predict the classes of a collection's images; resumable, bad files listed; under torchrun the
    ranks share the embedding and rank 0 writes and prints."""
    check_pile(args.data)
    from ..use.predict import predict
    from ..use.ranks import rank_session

    set_threads(args.threads)
    with rank_session(device(args.device)) as ranks:  # before the model: each rank takes its own GPU
        r = predict(args.classifier, args.data, args.out, top=args.top, batch_size=args.batch_size,
                    workers=args.workers, device=device(args.device), progress=not args.quiet,
                    chunk_size=args.chunk_size)
    if not ranks.is_main:
        return 0
    skipped = f"; skipped {r['bad']} ({r['bad_by_reason']}), listed in {r['files']['bad']}" if r["bad"] else ""
    print(f"openseer: {r['predicted']} images predicted -> {r['files']['predictions']}{skipped}")
    return 0
