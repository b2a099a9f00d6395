"""Label commands: ``select`` (which images of a pile to label first).

Thin: parse, call the package (openseer/use/select.py), print; the heavy modules are imported inside
the functions.
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
