"""Typical and diverse picks on embeddings (TypiClust, Hacohen et al. 2022), and the spherical k-means
and even shares they rest on.

``choose`` is ``openseer select``'s rule: cluster the candidates into as many clusters as there will
be labelled images, then take the most *typical* member (smallest mean distance to its nearest
neighbours in the cluster) of each of the largest clusters that hold no labelled image. It lives in
eval/ so that ``openseer eval`` can score labels chosen this way on its cached features; ``select``
(use/select.py) and ``curate`` (use/curate.py) use it and ``kmeans``/``water_fill`` from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

NEIGHBOURS = 20  # typicality: mean distance to this many nearest neighbours within the cluster
REDO = 5  # k-means starts: the best of 5 (one start can merge two separate clusters)


def kmeans(x: np.ndarray, k: int, seed: int = 0, niter: int = 20, nredo: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(centroids, assignment) by faiss spherical k-means; ``k`` is capped by the row count.

    ``nredo`` > 1: that many seeded k-means++ starts (``kmeans_pp``), keeping the one whose rows are
    nearest their centroids (sum of cosines); one random start can merge two separate clusters."""
    import faiss

    k = max(1, min(k, len(x)))
    x = np.ascontiguousarray(x, dtype=np.float32)
    best = None
    for r in range(nredo):
        km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed + r, spherical=True, verbose=False,
                          max_points_per_centroid=max(256, math.ceil(len(x) / k)), min_points_per_centroid=1)
        km.train(x, init_centroids=kmeans_pp(x, k, seed + r) if nredo > 1 else None)
        sims, assign = km.index.search(x, 1)
        score = float(sims.sum())
        if best is None or score > best[0]:
            best = (score, km.centroids, assign[:, 0].astype(np.int64))
    return best[1], best[2]


def kmeans_pp(x: np.ndarray, k: int, seed: int = 0, sample: int = 100_000) -> np.ndarray:
    """k-means++ seeds (Arthur and Vassilvitskii 2007) for unit rows, on at most ``sample`` rows: each
    next seed drawn with probability proportional to its squared distance to the nearest seed so far."""
    rng = np.random.default_rng(seed)
    if len(x) > sample:
        x = x[rng.choice(len(x), sample, replace=False)]
    seeds = [int(rng.integers(len(x)))]
    d2 = np.maximum(0.0, 2.0 - 2.0 * (x @ x[seeds[0]]).astype(np.float64))
    for _ in range(1, k):
        total = d2.sum()
        i = int(rng.choice(len(x), p=d2 / total)) if total > 0 else int(rng.integers(len(x)))
        seeds.append(i)
        d2 = np.minimum(d2, np.maximum(0.0, 2.0 - 2.0 * (x @ x[i]).astype(np.float64)))
    return np.ascontiguousarray(x[seeds], dtype=np.float32)


def water_fill(sizes: list[int], budget: int) -> list[int]:
    """Take ``budget`` items from clusters of ``sizes`` as evenly as possible: each gives min(size, t),
    leftovers going to the largest clusters first (ties: lowest index). Sums to min(budget, sum)."""
    budget = min(int(budget), int(sum(sizes)))
    take = [0] * len(sizes)
    left = budget
    open_ = [i for i, s in enumerate(sizes) if s > 0]
    while left > 0 and open_:
        share = left // len(open_)
        if share == 0:  # fewer items left than clusters: one more from the largest remainders
            for i in sorted(open_, key=lambda i: (-(sizes[i] - take[i]), i))[:left]:
                take[i] += 1
            break
        for i in open_:
            t = min(share, sizes[i] - take[i])
            take[i] += t
            left -= t
        open_ = [i for i in open_ if take[i] < sizes[i]]
    return take


@dataclass
class Pick:
    """One chosen row and why: its cluster, the cluster's size, its typicality, its order."""

    row: int
    cluster: int
    cluster_size: int
    typicality: float


def typicality(x: np.ndarray, neighbours: int = NEIGHBOURS) -> np.ndarray:
    """Per row of ``x`` (unit rows of one cluster): 1 / (mean L2 distance to its ``neighbours``
    nearest other rows + 1e-5), by faiss exact search. A lone row gets 0."""
    import faiss

    n = len(x)
    k = min(neighbours, n - 1)
    if k <= 0:
        return np.zeros(n, dtype=np.float64)
    x = np.ascontiguousarray(x, dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, _ = index.search(x, k + 1)
    dist = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * sims[:, 1:].astype(np.float64)))  # unit rows: |a-b|^2 = 2 - 2cos
    return 1.0 / (dist.mean(axis=1) + 1e-5)


def choose(x: np.ndarray, budget: int, candidates: np.ndarray | None = None,
           labelled: np.ndarray | None = None, seed: int = 0, neighbours: int = NEIGHBOURS,
           nredo: int = REDO) -> list[Pick]:
    """``budget`` rows of ``x`` (unit rows) to label, in the order chosen.

    ``candidates``: a boolean mask of the rows that may be picked (default all; ``select`` passes one
    member per near-duplicate group); ``labelled``: the embeddings (unit rows) of images already
    labelled, whose clusters count as covered; ``nredo``: k-means starts, the best kept (1: one
    random start, for a quick choice on a large pile).
    """
    n = len(x)
    cand = np.flatnonzero(np.ones(n, bool) if candidates is None else candidates)
    lab = np.zeros((0, x.shape[1]), np.float32) if labelled is None else np.asarray(labelled, np.float32)
    budget = min(int(budget), len(cand))
    if budget <= 0:
        return []
    xc = np.ascontiguousarray(x[cand], dtype=np.float32)
    cents, assign = kmeans(xc, len(lab) + budget, seed=seed, nredo=nredo)
    k = len(cents)
    sizes = np.bincount(assign, minlength=k)
    covered = np.zeros(k, dtype=np.int64)
    if len(lab):
        np.add.at(covered, np.argmax(lab @ cents.T, axis=1), 1)
    open_ = [c for c in np.argsort(-sizes, kind="stable") if sizes[c] > 0]
    uncovered = [c for c in open_ if covered[c] == 0]
    if len(uncovered) >= budget:  # the usual case: one pick from each of the largest uncovered clusters
        share = {int(c): 1 for c in uncovered[:budget]}
    else:  # fewer clusters than picks: uncovered ones first, the rest shared evenly over all clusters
        share = {int(c): 1 for c in uncovered}
        rest = water_fill([int(sizes[c]) - share.get(int(c), 0) for c in open_], budget - len(share))
        for c, t in zip(open_, rest):
            share[int(c)] = share.get(int(c), 0) + t
    picks: list[Pick] = []
    for c in sorted(share, key=lambda c: (-sizes[c], c)):
        members = np.flatnonzero(assign == c)
        typ = typicality(xc[members], neighbours)
        for j in np.argsort(-typ, kind="stable")[:share[c]]:
            picks.append(Pick(int(cand[members[j]]), int(c), int(sizes[c]), float(typ[j])))
    return picks
