"""``curate``'s index steps at a million images, embeddings given: duplicate links and k-means.

    .venv/bin/python bench/curate_scale.py                     # 1,000,000 x 256-d: about 15 minutes on 2 cores
    .venv/bin/python bench/curate_scale.py --n 100000          # quick

Synthetic embeddings, seeded: ``--n`` unit rows of ``--dim`` floats around ``--centres`` cluster
centres (members at cosine ~0.5 to each other, far below the duplicate threshold), plus ``--copies``
planted near-duplicates (a row plus a little noise: cosine 0.96-0.995 to it). Runs what ``openseer
curate --dup-by embedding --embeddings DIR`` runs after reading them: ``curate.duplicate_groups``
(faiss search chosen by size: data/search.py), the best member per group, ``curate.cluster`` (faiss
k-means trained on at most 256 rows a centroid, every row assigned), and measures:

* wall seconds of each step and the peak resident memory, beside ``curate.memory_needed``'s estimate;
* link recall against exact search: for ``--sample`` rows, the share of the pairs within the
  threshold (exact flat range search over all rows) that the duplicate links hold;
* planted copies put in their source's group.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time

import numpy as np

from openseer.data.search import VectorSearch
from openseer.use.curate import DUP_THRESHOLD, cluster, duplicate_groups, group_representatives, memory_needed


def embeddings(n: int, dim: int, centres: int, copies: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, source of each planted copy: -1 for the others), built a block at a time (float32)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = np.empty((n, dim), np.float32)
    for s in range(0, n, 65536):
        m = min(65536, n - s)
        x[s:s + m] = c[rng.integers(0, centres, m)] + rng.standard_normal((m, dim)).astype(np.float32) / math.sqrt(dim)
    source = np.full(n, -1, np.int64)
    rows = rng.choice(n, 2 * copies, replace=False)
    src, dst = rows[:copies], rows[copies:]
    t2 = rng.uniform(0.005, 0.04, copies).astype(np.float32)  # noise energy: cosine 1/sqrt(1 + t2)
    x[dst] = x[src] / np.linalg.norm(x[src], axis=1, keepdims=True) + (
        rng.standard_normal((copies, dim)).astype(np.float32) * np.sqrt(t2 / dim)[:, None])
    source[dst] = src
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, source


def peak_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--centres", type=int, default=1000)
    ap.add_argument("--copies", type=int, default=20000)
    ap.add_argument("--sample", type=int, default=2000)
    ap.add_argument("--threshold", type=float, default=DUP_THRESHOLD)
    ap.add_argument("--search", default="auto", help="the links' faiss search: auto (curate's choice), flat, hnsw, ivf")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.perf_counter()
    x, source = embeddings(args.n, args.dim, args.centres, args.copies, args.seed)
    make_s = time.perf_counter() - t0
    k = max(2, min(4096, round(math.sqrt(args.n))))  # curate's default --clusters
    estimate = memory_needed(args.n, args.dim, k, dup_by="embedding")

    t0 = time.perf_counter()
    info: dict = {"want_links": True}
    groups = duplicate_groups(x, args.threshold, info=info, search=args.search)
    dup_s = time.perf_counter() - t0
    dup_peak = peak_gib()
    a, b = info.pop("links")
    rep = group_representatives(x, groups)

    t0 = time.perf_counter()
    rows = np.flatnonzero(rep)
    _, assign = cluster(x[rows], k, seed=args.seed)
    kmeans_s = time.perf_counter() - t0

    # link recall on a sample: the pairs within the threshold by exact search, found among the links
    rng = np.random.default_rng(args.seed + 1)
    planted = np.flatnonzero(source >= 0)
    sample = np.unique(np.concatenate([rng.choice(args.n, args.sample // 2, replace=False),
                                       rng.choice(planted, min(len(planted), args.sample // 2), replace=False)]))
    qi, _, ids = VectorSearch(x, kind="flat").range(x[sample], args.threshold)
    exact = {(int(sample[q]), int(j)) for q, j in zip(qi.tolist(), ids.tolist()) if sample[q] != j}
    in_sample = np.isin(a, sample) | np.isin(b, sample)
    found = set()
    for i, j in zip(a[in_sample].tolist(), b[in_sample].tolist()):
        found.add((i, j))
        found.add((j, i))
    link_recall = len(exact & found) / max(1, len(exact))
    same = float(np.mean(groups[planted] == groups[source[planted]]))

    print(json.dumps({
        "bench": "curate_scale", "n": args.n, "dim": args.dim, "centres": args.centres, "copies": args.copies,
        "make_s": round(make_s, 1), "search": info.get("search"),
        "duplicates": {"seconds": round(dup_s, 1), "groups": int(groups.max()) + 1,
                       "link_recall_vs_exact": round(link_recall, 4), "exact_links_sampled": len(exact),
                       "planted_in_source_group": round(same, 4)},
        "kmeans": {"clusters": k, "rows": len(rows), "seconds": round(kmeans_s, 1),
                   "sizes_min_max": [int(np.bincount(assign).min()), int(np.bincount(assign).max())]},
        "peak_rss_gib": {"after_duplicates": dup_peak, "end": peak_gib()},
        "memory_estimate_gib": round(estimate / 2**30, 2),
        "cores": os.cpu_count(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
