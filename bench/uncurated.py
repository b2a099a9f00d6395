"""Uncurated piles: curated vs uncurated vs auto-curated pretraining at the same budget.

    .venv/bin/python bench/uncurated.py --minutes 15                       # the full benchmark (about an hour)
    .venv/bin/python bench/uncurated.py --minutes 1 --scale 0.25 --protocols knn,linear \\
        --limit-train 10000 --limit-test 2000                              # a quick check (~10 minutes)

Three tiny-cpu pretrainings of M minutes each (labels unused), each evaluated on Fashion-MNIST's
test split with ``openseer eval``:

(a) **curated**: the 60,000 Fashion-MNIST train images (balanced, deduplicated), as PNG files;
(b) **uncurated**: the pile of ``openseer.data.pile`` (Zipf-long-tailed Fashion-MNIST, off-domain
    photo crops, noise, near-blank images, near-duplicates up to hundreds of copies), as files;
(c) **auto-curated**: the pile after ``openseer curate`` with **(b)'s own model as the first-pass
    model** (the SEER-like case: no outside model), ``--reference`` a 1,000-image Fashion-MNIST sample
    that is not in the pile (what the off-domain test compares with) and ``--drop-off-domain``, keeping
    ``--curate-keep`` of the pile; trained on the shards ``curate --shards`` writes.

All three read files through the same decoder (a folder or shards), so only the data differ. (a) is
evaluated with every protocol and the baselines (raw pixels, random init, supervised from scratch);
(b) and (c) with the same protocols without the baselines (they do not depend on the pretraining).
Prints one JSON line with every number, the pile's mix and the curation's counts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from openseer.config import ConfigError, build_config
from openseer.data.collection import DataError, load_fashion_mnist
from openseer.data.pile import PileError, PileSpec, build_pile, read_answer_key
from openseer.eval.common import EvalError
from openseer.eval.runner import PROTOCOLS, EvalOptions, evaluate
from openseer.model.backbone import BackboneError
from openseer.train.checkpoint import CheckpointError
from openseer.train.loop import RunError, pretrain
from openseer.use.curate import curate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_mnist import EPOCH_CAP  # noqa: E402  (the same clock-bounded pretraining)

REFERENCE = 1000


def top1(doc: dict, model: str, protocol: str, split: str, k: int | None = None) -> float | None:
    for r in doc["results"]:
        if (r["model"], r["protocol"], r["split"]) == (model, protocol, split) and r.get("k", k) == k:
            return r["top1"]
    return None


def numbers(doc: dict) -> dict:
    """The bench's numbers of one eval report (as bench/fashion_mnist.py names them)."""
    line = {"knn20": top1(doc, "this", "knn", "full", 20), "linear": top1(doc, "this", "linear", "full"),
            "knn20_1pct": top1(doc, "this", "knn", "1pct", 20), "linear_1pct": top1(doc, "this", "linear", "1pct"),
            "knn20_10pct": top1(doc, "this", "knn", "10pct", 20), "linear_10pct": top1(doc, "this", "linear", "10pct"),
            "finetune_1pct": top1(doc, "this", "finetune", "1pct"),
            "finetune_10pct": top1(doc, "this", "finetune", "10pct")}
    for split in ("1pct", "10pct"):
        vals = [line[f"{p}_{split}"] for p in ("knn20", "linear", "finetune") if line[f"{p}_{split}"] is not None]
        line[f"best_{split}"] = max(vals) if vals else None
    return line


def baselines(doc: dict) -> dict:
    return {"random_knn20": top1(doc, "random_init", "knn", "full", 20),
            "random_linear": top1(doc, "random_init", "linear", "full"),
            "pixels_knn20": top1(doc, "pixels", "knn", "full", 20), "pixels_linear": top1(doc, "pixels", "linear", "full"),
            "scratch_1pct": top1(doc, "scratch", "finetune", "1pct"),
            "scratch_10pct": top1(doc, "scratch", "finetune", "10pct")}


def write_folder(images: torch.Tensor, rows: list[int], folder: Path) -> Path:
    """Fashion-MNIST images ``rows`` as PNG files (kept when already complete)."""
    done = folder / ".complete"
    if done.is_file() and done.read_text().strip() == str(len(rows)):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for n, i in enumerate(rows):
        sub = folder / f"{n // 1000:03d}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(images[i, 0].numpy(), mode="L").save(sub / f"{i:05d}.png")
    done.write_text(f"{len(rows)}\n")
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, required=True, help="pretraining budget of each of the three runs")
    p.add_argument("--out", help="folder for the runs (default runs/bench-uncurated-<M>m)")
    p.add_argument("--data-dir", default="runs/bench-uncurated-data",
                   help="where the pile and the curated folder are built (reused when already built)")
    p.add_argument("--scale", type=float, default=1.0, help="pile size multiplier (1: ~60,000 files)")
    p.add_argument("--seed", type=int, default=0, help="pile and pretraining seed")
    p.add_argument("--curate-keep", type=float, default=0.4, help="--keep for (c) (default 0.4 of the pile)")
    p.add_argument("--protocols", default=",".join(PROTOCOLS), help="eval protocols (default all)")
    p.add_argument("--limit-train", type=int, default=0, help="eval on a subset of the train labels (quick checks)")
    p.add_argument("--limit-test", type=int, default=0, help="eval on a subset of the test images (quick checks)")
    p.add_argument("--only", default="a,b,c", help="which of a,b,c to run (default all)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides for all three pretrainings")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = Path(args.out or f"runs/bench-uncurated-{args.minutes:g}m")
    data_dir = Path(args.data_dir)
    protocols = tuple(args.protocols.split(","))
    t0 = time.perf_counter()
    s = args.scale
    # half the pile in-domain: 17,500 Fashion-MNIST images, Zipf over the 10 classes (the head class
    # takes 34%, 5,975 of its 6,000 train images), a fifth off-domain photo crops, a quarter near-copies
    spec = PileSpec(seed=args.seed, in_domain=round(17500 * s), off_domain=round(7000 * s), noise=round(875 * s),
                    blank=round(875 * s), dup_sources=max(1, round(350 * s)), dup_copies=round(8750 * s),
                    dup_max=max(2, round(400 * min(1.0, s * 2))))
    pile_dir = data_dir / f"pile-seed{args.seed}-x{s:g}"
    try:
        images, _ = load_fashion_mnist("train")
        built = json.loads((pile_dir / "pile.json").read_text()) if (pile_dir / "pile.json").is_file() else None
        if built is None or built.get("spec") != spec.__dict__:
            t = time.perf_counter()
            mix = build_pile(pile_dir, spec)
            mix["build_s"] = round(time.perf_counter() - t, 1)
        else:
            mix = built
        # the reference for the off-domain estimate: train images the pile does not hold
        used = {int(r["source"].rsplit(":", 1)[1]) for r in read_answer_key(pile_dir).values()
                if r["source"].startswith("fashion-mnist:")}
        rng = np.random.default_rng(args.seed)
        spare = [i for i in range(len(images)) if i not in used]
        ref_dir = write_folder(images, sorted(rng.choice(spare, REFERENCE, replace=False).tolist()),
                               pile_dir.parent / f"reference-seed{args.seed}-x{s:g}")
        fm_dir = write_folder(images, list(range(len(images))), data_dir / "fashion-mnist-train")
        base = ["log.progress=false", "log.tensorboard=false"] + ([f"threads={args.threads}"] if args.threads else [])
        overrides = [*base, f"optim.minutes={args.minutes:g}", f"optim.epochs={EPOCH_CAP}", "checkpoint.every=100000",
                     f"seed={args.seed}", *args.overrides]
        runs: dict[str, dict] = {}
        docs: dict[str, dict] = {}

        def train_eval(name: str, data: str, with_baselines: bool) -> None:
            run = out / name
            if (run / "eval.json").is_file():  # reuse a finished leg (rerun after an interruption)
                docs[name] = json.loads((run / "eval.json").read_text())
                runs[name] = json.loads((run / "bench-leg.json").read_text())
                return
            cfg = build_config("tiny-cpu", overrides, base={"data": {"source": data}})
            t1 = time.perf_counter()
            summary = pretrain(cfg, run)
            pre_s = time.perf_counter() - t1
            t2 = time.perf_counter()
            protos = protocols if with_baselines else tuple(x for x in protocols if x != "baselines")
            docs[name] = evaluate(EvalOptions(weights=str(run), data="fashion-mnist", out=str(run / "eval.json"),
                                              protocols=protos, limit_train=args.limit_train,
                                              limit_test=args.limit_test, progress=False,
                                              command="bench/uncurated.py " + " ".join(sys.argv[1:])))
            runs[name] = {"data": data, "steps": summary["step"],
                          "images_seen": summary["counters"]["images_seen"],
                          "train_s": summary["counters"].get("train_seconds"), "pretrain_s": round(pre_s, 1),
                          "eval_s": round(time.perf_counter() - t2, 1)}
            (run / "bench-leg.json").write_text(json.dumps(runs[name]) + "\n")

        legs = args.only.split(",")
        if "a" in legs:
            train_eval("a_curated", str(fm_dir), True)
        if "b" in legs or "c" in legs:
            train_eval("b_uncurated", str(pile_dir), "a" not in legs)
        cur = None
        if "c" in legs:
            t3 = time.perf_counter()
            cur_dir = out / "c_curation"
            cur = curate(str(pile_dir), cur_dir, str(out / "b_uncurated"), keep=args.curate_keep,
                         reference=str(ref_dir), drop_off_domain=True, seed=args.seed, shards=True,
                         progress=False, log=lambda text: None)
            cur["curate_s"] = round(time.perf_counter() - t3, 1)
            cur["quality"] = curation_quality(pile_dir, cur_dir)
            train_eval("c_autocurated", str(cur_dir / "shards"), False)
    except (ConfigError, DataError, EvalError, RunError, CheckpointError, BackboneError, PileError) as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    line: dict = {"bench": "uncurated", "minutes": args.minutes, "scale": s, "seed": args.seed,
                  "protocols": list(protocols), "limit_train": args.limit_train, "limit_test": args.limit_test,
                  "first_pass_model": "(b): the pile's own pretraining (SEER-like)"}
    first = next((docs[k] for k in ("a_curated", "b_uncurated") if k in docs), None)
    if first is not None:
        line["baselines"] = baselines(first)
    for name in docs:
        line[name] = {**numbers(docs[name]), **runs[name]}
    a, b, c = (line.get(k, {}) for k in ("a_curated", "b_uncurated", "c_autocurated"))
    for m in ("knn20", "linear"):
        if a.get(m) is not None and b.get(m) is not None:
            line[f"gap_a_minus_b_{m}"] = round(a[m] - b[m], 2)
        if a.get(m) is not None and c.get(m) is not None:
            line[f"gap_a_minus_c_{m}"] = round(a[m] - c[m], 2)
        px = line.get("baselines", {}).get(f"pixels_{m}")
        if b.get(m) is not None and px is not None:
            line[f"b_above_pixels_{m}"] = round(b[m] - px, 2)
    line["pile"] = {k: mix.get(k) for k in ("files", "kinds", "in_domain_per_class", "groups", "group_sizes_top",
                                            "photographs", "digest", "build_s")}
    if cur is not None:
        line["curation"] = {k: cur.get(k) for k in ("inputs", "decoded", "bad", "kept", "decisions", "duplicate_groups",
                                                    "largest_group", "clusters", "off_domain", "curate_s",
                                                    "quality", "seconds")}
    line["overrides"] = overrides
    line["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(line))
    return 0


def curation_quality(pile_dir: Path, cur_dir: Path) -> dict:
    """The curation scored against the pile's answer key: what share of each kind it kept, the kept
    in-domain class balance, and the off-domain estimate against the truth."""
    import csv

    key = read_answer_key(pile_dir)
    root = pile_dir.resolve()
    kept_kind: dict[str, int] = {}
    all_kind: dict[str, int] = {}
    classes = [0] * 10
    junk = ("off_domain", "noise", "blank")
    flagged = flagged_junk = n_junk = 0
    group_members: dict[str, int] = {}
    dropped_in_groups = dropped_single = singles = 0
    with open(cur_dir / "decisions.csv", newline="") as f:
        for r in csv.DictReader(f):
            try:
                name = str(Path(r["path"]).resolve().relative_to(root))
            except ValueError:
                continue
            truth = key.get(name)
            if truth is None:
                continue
            kind = truth["kind"]
            all_kind[kind] = all_kind.get(kind, 0) + 1
            is_junk = kind in junk or (kind == "near_duplicate" and int(truth["label"]) < 0)
            n_junk += is_junk
            flagged += r["off_domain"] == "yes"
            flagged_junk += r["off_domain"] == "yes" and is_junk
            if truth["group"] != "-1":
                group_members[truth["group"]] = group_members.get(truth["group"], 0) + 1
                dropped_in_groups += r["decision"] == "duplicate"
            else:
                singles += 1
                dropped_single += r["decision"] == "duplicate"
            if r["kept"] == "yes":
                kept_kind[kind] = kept_kind.get(kind, 0) + 1
                if int(truth["label"]) >= 0:
                    classes[int(truth["label"])] += 1
    ideal = sum(n - 1 for n in group_members.values())
    return {"kept_by_kind": kept_kind, "pile_by_kind": all_kind, "kept_per_class": classes,
            "duplicates_dropped_of_ideal": round(dropped_in_groups / ideal, 4) if ideal else None,
            "distinct_images_dropped_as_duplicate": round(dropped_single / singles, 4) if singles else None,
            "off_domain_flagged": flagged, "off_domain_true": n_junk,
            "off_domain_precision": round(flagged_junk / flagged, 4) if flagged else None,
            "off_domain_recall": round(flagged_junk / n_junk, 4) if n_junk else None}


if __name__ == "__main__":
    sys.exit(main())
