"""Inner-product search over unit vectors that scales with the pile: exact where it is cheap,
approximate (faiss HNSW or IVF-flat) beyond.

Both the near-copy candidates of ``takedown --near`` (a range search: every vector within a cosine
threshold) and ``curate``'s duplicate links (the k nearest neighbours of every image) go through
``VectorSearch``. The kind is chosen by size:

* up to ``EXACT_MAX`` vectors: ``IndexFlatIP``, exact (N x d multiply-adds per query, no build);
  (``choose_kind``; ``curate``'s links and the takedowns' range search go to IVF beyond exact search:
  ``choose_links_kind``, ``choose_range_kind``)
* up to ``HNSW_MAX``: ``IndexHNSWFlat`` (graph of ``HNSW_M`` links a vector, ~2 x 4 x M bytes a
  vector beyond the vectors; high recall, a build of minutes at a million on 2 cores);
* beyond: ``IndexIVFFlat`` with ~4 sqrt(N) lists trained on a sample (a fast build; ``nprobe``
  lists searched a query).

The recall of the approximate kinds against exact search is measured by ``recall_against_exact``
(tests/data/test_index.py runs it on a constructed pile with the thresholds lowered).

A takedown's range search asks ~1,400 query windows at once, so its exact search stops earlier
(``RANGE_EXACT_MAX``) and its approximate one is IVF-flat, never HNSW: an IVF range search returns
every vector within the threshold in the lists it probes, where HNSW's stops at ``efSearch``
results a query (the bench's look-alike garments have hundreds within 0.8). ``save`` / ``load``
keep a built index on disk beside the pile index (data/index.py ``QuickIndex``), memory-mapped when read.
"""

from __future__ import annotations

import math
import os

import numpy as np

EXACT_MAX = 200_000  # vectors: exact flat search below this
HNSW_MAX = 2_000_000  # vectors: HNSW below this, IVF-flat above
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 256
IVF_NPROBE = 32
IVF_TRAIN_PER_LIST = 64  # training sample: this many vectors per list (faiss warns below 39)
RANGE_EXACT_MAX = 20_000  # vectors: a takedown's range search is exact below this (0.13 s at 10,000)
FLAT_WORK_MAX = 2e12  # multiply-adds an exact search may take (a few minutes on 2 cores), else approximate


def choose_kind(n: int, exact_max: int = EXACT_MAX, hnsw_max: int = HNSW_MAX, queries: int = 0, dim: int = 0) -> str:
    """``flat``, ``hnsw`` or ``ivf`` for ``n`` vectors; with ``queries`` (of ``dim`` floats) to
    answer, exact search only while its work (queries x n x dim) stays under ``FLAT_WORK_MAX``."""
    if n < exact_max and queries * n * dim <= FLAT_WORK_MAX:
        return "flat"
    return "hnsw" if n < hnsw_max else "ivf"


def choose_links_kind(n: int, queries: int = 0, dim: int = 0) -> str:
    """``flat`` or ``ivf`` for ``curate``'s duplicate links (k nearest neighbours of every row): exact
    while ``choose_kind`` says so, else IVF-flat, which on 100,000 clustered 256-d rows with planted
    copies found every exact link in a third of HNSW's time (bench/curate_scale.py, docs/data.md)."""
    return "flat" if choose_kind(n, queries=queries, dim=dim) == "flat" else "ivf"


def choose_range_kind(n: int, exact_max: int = 0) -> str:
    """``flat`` or ``ivf`` for a takedown's range search over ``n`` vectors (see the module docstring)."""
    return "flat" if n < (exact_max or RANGE_EXACT_MAX) else "ivf"


def memory_bytes(n: int, d: int, kind: str) -> int:
    """Bytes the index of ``n`` vectors of ``d`` floats holds (vectors plus the kind's structure)."""
    vectors = n * d * 4
    if kind == "hnsw":
        return vectors + n * (2 * HNSW_M * 4 + 16)
    if kind == "ivf":
        return vectors + n * 8 + _nlist(n) * d * 4
    return vectors


def _nlist(n: int) -> int:
    return max(1, min(65536, int(4 * math.sqrt(max(n, 1))), n // 39))  # faiss wants >= 39 points a list


RANGE_BLOCK = 64  # queries per HNSW range search (see VectorSearch.range)


class VectorSearch:
    """A faiss inner-product index over the rows of ``x`` (unit vectors), its kind chosen by size."""

    def __init__(self, x: np.ndarray, kind: str = "auto", exact_max: int = EXACT_MAX, hnsw_max: int = HNSW_MAX,
                 seed: int = 0):
        import faiss

        x = np.ascontiguousarray(x, dtype=np.float32)
        self.n, self.d = x.shape if x.ndim == 2 else (0, int(x.shape[-1]) if x.ndim else 0)
        self.kind = choose_kind(self.n, exact_max, hnsw_max) if kind == "auto" else kind
        if self.kind == "flat" or self.n == 0:
            self.kind = "flat"
            self.index = faiss.IndexFlatIP(self.d)
        elif self.kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(self.d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            self.index.hnsw.efSearch = HNSW_EF_SEARCH
        elif self.kind == "ivf":
            nlist = _nlist(self.n)
            quantizer = faiss.IndexFlatIP(self.d)
            self.index = faiss.IndexIVFFlat(quantizer, self.d, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(seed)
            m = min(self.n, nlist * IVF_TRAIN_PER_LIST)
            sample = x if m == self.n else x[np.sort(rng.choice(self.n, m, replace=False))]
            self.index.train(sample)
            self.index.nprobe = min(nlist, IVF_NPROBE)
            self._quantizer = quantizer  # kept alive with the index
        else:
            raise ValueError(f"unknown search kind {kind!r} (flat, hnsw, ivf or auto)")
        if self.n:
            self.index.add(x)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def save(self, path: str | os.PathLike) -> None:
        """Write the built index to ``path`` (faiss's own format)."""
        import faiss

        faiss.write_index(self.index, os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike, kind: str) -> VectorSearch:
        """An index written by ``save``, memory-mapped (its vectors are paged in as searched)."""
        import faiss

        self = cls.__new__(cls)
        self.index = faiss.read_index(os.fspath(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        self.kind, self.n, self.d = kind, int(self.index.ntotal), int(self.index.d)
        if kind == "ivf":
            self.index.nprobe = min(int(self.index.nlist), IVF_NPROBE)
        if kind == "hnsw":
            self.index.hnsw.efSearch = HNSW_EF_SEARCH
        return self

    def describe(self) -> dict:
        """What was built, for reports."""
        out: dict = {"kind": self.kind, "vectors": len(self), "dim": self.d,
                     "memory_bytes": memory_bytes(len(self), self.d, self.kind)}
        if self.kind == "hnsw":
            out |= {"M": HNSW_M, "efSearch": HNSW_EF_SEARCH}
        if self.kind == "ivf":
            out |= {"nlist": int(self.index.nlist), "nprobe": int(self.index.nprobe)}
        return out

    def knn(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, ids) of the ``k`` nearest rows to each query (ids -1 where fewer were found)."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        k = max(1, min(k, max(len(self), 1)))
        if not len(self) or not len(q):
            return np.zeros((len(q), k), np.float32), np.full((len(q), k), -1, np.int64)
        return self.index.search(q, k)

    def range(self, q: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query row, similarity, id) of every row within ``threshold`` of a query."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        if not len(self) or not len(q):
            return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64)
        # HNSW's range search aborts the process (faiss::RangeSearchResult::do_allocation) on more
        # than one internal block of queries: ask it RANGE_BLOCK queries at a time
        block = RANGE_BLOCK if self.kind == "hnsw" else len(q)
        rows, all_sims, all_ids = [], [], []
        for s in range(0, len(q), block):
            lims, sims, ids = self.index.range_search(q[s:s + block], float(threshold))
            rows.append(s + np.repeat(np.arange(min(block, len(q) - s)), np.diff(lims.astype(np.int64))))
            all_sims.append(sims)
            all_ids.append(ids.astype(np.int64))
        return np.concatenate(rows), np.concatenate(all_sims), np.concatenate(all_ids)


def recall_against_exact(x: np.ndarray, queries: np.ndarray, kind: str, k: int = 10,
                         threshold: float | None = None) -> float:
    """The share of exact results an approximate ``kind`` finds: of the k nearest neighbours, or
    (with ``threshold``) of the pairs within it."""
    exact = VectorSearch(x, kind="flat")
    approx = VectorSearch(x, kind=kind)
    if threshold is None:
        _, e = exact.knn(queries, k)
        _, a = approx.knn(queries, k)
        hit = sum(len(set(er[er >= 0].tolist()) & set(ar[ar >= 0].tolist())) for er, ar in zip(e, a))
        return hit / max(1, int((e >= 0).sum()))
    eq, _, ei = exact.range(queries, threshold)
    aq, _, ai = approx.range(queries, threshold)
    want = set(zip(eq.tolist(), ei.tolist()))
    return len(want & set(zip(aq.tolist(), ai.tolist()))) / max(1, len(want))
