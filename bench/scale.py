"""Takedowns at pile size: index build, index size, takedown latency and recall through the index.

    .venv/bin/python bench/scale.py                        # a 10,000-image pile: about 3 minutes on 2 cores
    .venv/bin/python bench/scale.py --images 100000        # larger piles (pile writing dominates)
    .venv/bin/python bench/scale.py --images 1000000       # about an hour on 2 cores: 20 min to write the
                                                           # pile (once), 30 min to index, 18 GB peak

The pile is ``openseer.data.pile.build_pile`` scaled to ``--images`` files (Fashion-MNIST, at most
the bench pile's 17,500 (Fashion-MNIST holds no more for its class balance), grey crops of the
wallpaper photographs taking the rest, noise, near-blank images and heavy-tailed near-copy groups: re-encoded,
resized, cropped, flipped), written once under ``--work`` and reused. Measured:

* ``openseer index`` (``openseer.data.index.build_index``): images/s, bytes per image on disk;
* a takedown through the index (``StoredIndex.copies_of``, what ``takedown add/check --near`` run),
  for ``--queries`` group sources: the whole answer (opening the index (its snapshot, see
  data/index.py ``QuickIndex``), describing the query, searching, verifying candidates), median and p99
  seconds; recall = group members found by their source; ``recall_pictures`` leaves out the
  groups whose source is near-blank (the pile's ``blank`` kind, a flat level plus 1.5 levels of
  noise, and any source too flat to be described: ``--near`` does not match near-blank images, by
  design, docs/data.md: one is no more a copy of another than of any other of its grey level), and
  ``found_by_source_kind`` splits recall by the source's kind; false
  matches = images outside the query's group that were matched, as a share of the pile's non-group
  images;
* the approximate search a takedown uses beyond ``search.RANGE_EXACT_MAX`` descriptors (IVF-flat)
  against exact search on the index's whole-image descriptors: recall of the pairs within the
  near-copy threshold, for 2,000 pile images as queries.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from openseer.data import index as ix
from openseer.data.decode import load_image
from openseer.data.nearcopy import THRESHOLD
from openseer.data.pile import PileSpec, build_pile, read_answer_key
from openseer.data.search import choose_range_kind, recall_against_exact

NOT_PICTURES = ("blank", "flat source")  # near-blank sources: out of --near's reach by design


def scaled_spec(n: int, seed: int = 0) -> PileSpec:
    """The benchmark pile's mix (35,000 files) scaled to about ``n`` files."""
    base = PileSpec(seed=seed)
    f = n / base.total()
    # Fashion-MNIST has 6,000 train images a class and the Zipf head class takes 5,975 of the bench
    # pile's 17,500: beyond that the in-domain share stays and photo crops (unlimited) take the rest
    in_domain = min(round(base.in_domain * f), base.in_domain)
    return PileSpec(seed=seed, in_domain=in_domain,
                    off_domain=round(base.off_domain * f) + round(base.in_domain * f) - in_domain,
                    noise=round(base.noise * f), blank=round(base.blank * f),
                    dup_sources=max(10, round(base.dup_sources * f)), dup_copies=round(base.dup_copies * f),
                    dup_max=max(20, round(base.dup_max * min(1.0, f))))


def cpu_model() -> str:
    """lscpu's model name (the CPU changes between machines: figures are compared within one run)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--work", default="runs/bench-scale")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    pile = Path(args.work) / f"pile-{args.images}"
    t0 = time.perf_counter()
    if not (pile / "pile.csv").is_file():
        build_pile(pile, scaled_spec(args.images, args.seed))
    build_s = time.perf_counter() - t0
    key = read_answer_key(pile)
    n = len(key)

    t0 = time.perf_counter()
    r = ix.build_index(str(pile), rebuild=True, progress=False, log=lambda t: None)
    index_s = time.perf_counter() - t0
    folder = Path(r["folder"])
    snap_bytes = folder_bytes(folder / "snapshots") if (folder / "snapshots").is_dir() else 0

    groups: dict[str, list[str]] = {}
    for name, row in key.items():
        if int(row["group"]) >= 0:
            groups.setdefault(row["group"], []).append(name)
    sources = sorted(name for name, row in key.items() if int(row["group"]) >= 0 and row["kind"] != "near_duplicate")
    rng = random.Random(args.seed)
    queries = rng.sample(sources, min(args.queries, len(sources)))
    t = time.perf_counter()
    stored = ix.open_index(str(pile))  # from the snapshot the build kept
    open_s = time.perf_counter() - t
    described = set(stored.keys)  # a flat (near-blank) source has no descriptor: out of --near's reach by design
    seconds, found_share, false = [], [], 0
    by_kind: dict[str, list[int]] = {}
    outside_total = 0
    for q in queries:
        members = set(groups[key[q]["group"]])
        img = load_image(str(pile / q))
        t = time.perf_counter()
        hits = ix.open_index(str(pile)).copies_of(img)
        seconds.append(time.perf_counter() - t)
        got = {k for k, *_ in hits}
        found_share.append(len(got & members) / len(members))
        k = key[q]["kind"] if q in described else "flat source"
        by_kind.setdefault(k, [0, 0])
        by_kind[k][0] += len(got & members)
        by_kind[k][1] += len(members)
        false += len(got - members)
        outside_total += n - len(members)

    x = np.asarray(stored.vectors, np.float32).reshape(len(stored.keys), -1)
    qs = x[np.random.default_rng(args.seed).choice(len(x), size=min(2000, len(x)), replace=False)]
    kind = choose_range_kind(len(x))
    approx_recall = recall_against_exact(x, qs, "ivf", threshold=THRESHOLD)

    seconds.sort()
    print(json.dumps({
        "bench": "scale", "images": n, "pile_build_s": round(build_s, 1),
        "index": {"images_per_s": round(n / index_s, 1), "seconds": round(index_s, 1),
                  "bytes_per_image": round(folder_bytes(folder) / n),
                  "snapshot_bytes_per_image": round(snap_bytes / n), "described": r["described"]},
        "takedown": {"queries": len(queries), "median_s": round(statistics.median(seconds), 3),
                     "p99_s": round(seconds[min(len(seconds) - 1, int(0.99 * len(seconds)))], 3),
                     "recall": round(float(np.mean(found_share)), 4),
                     "recall_pictures": round(sum(v[0] for k, v in by_kind.items() if k not in NOT_PICTURES)
                                              / max(1, sum(v[1] for k, v in by_kind.items() if k not in NOT_PICTURES)), 4),
                     "found_by_source_kind": {k: f"{v[0]}/{v[1]}" for k, v in sorted(by_kind.items())},
                     "open_s": round(open_s, 3),
                     "false_match_share": round(false / max(1, outside_total), 7)},
        "search": kind, "ivf_pair_recall": round(approx_recall, 4),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
        "python": sys.version.split()[0],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
