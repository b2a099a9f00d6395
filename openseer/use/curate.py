"""``openseer curate``: turn an uncurated pile into a deduplicated, rebalanced training list.

Steps (each decision is written to ``decisions.csv``):

1. **Embed** every image of the pile with a backbone (a run, an exported file or a timm name) through
   ``openseer embed``'s machinery (``embed/`` inside ``--out``: resumable chunk by chunk; bad
   images are skipped, counted by reason and listed).
2. **Near-duplicates.** By default (``--dup-by descriptor``) the near-copy descriptors of the pile's
   index (data/index.py, built or brought up to date first: 16 x 16 grey, mean removed; each image,
   its mirror image and a few crop windows (linked at cosine >= 0.98), so crops and flipped crops
   are linked to their original),
   else (``--dup-by embedding``) the L2-normalised embeddings, go into a faiss inner-product index
   (exact, or approximate beyond ``search.EXACT_MAX`` images: data/search.py); each image is linked to
   those of its 64 nearest neighbours with cosine >= ``--dup-threshold``; the connected components of
   the links are cut into stars around seeds (every member within the threshold of its seed), so a
   chain of look-alike garments cannot become one group. (A short SwAV pretraining gives class-level
   features: by embedding, 86% of the distinct images of the benchmark pile were grouped as
   duplicates; by descriptor 18%, finding 81% of the true duplicates: docs/benchmarks.md.) Each group
   keeps its best copy, the largest (pixel count, then file size: the original over a thumbnail or a
   re-encoding), and the others are dropped as ``duplicate``; the report says which method ran.
3. **Off-domain** (with ``--reference DATA``, a small sample of the wanted domain): a pile image is
   off-domain when its best cosine similarity to the reference is below what 99% of reference images
   reach to their nearest other reference image (leave-one-out, so the threshold comes from the
   reference itself). The share is reported; ``--drop-off-domain`` also drops them.
4. **Rebalance.** faiss k-means on the remaining embeddings (``--clusters`` centroids; ``--levels 2``
   clusters the centroids again: hierarchical), then balanced sampling: the budget is split evenly
   across the top-level clusters (a small cluster gives what it has and the rest is shared among
   the others), recursively down the levels, and a leaf cluster gives random members (seeded).
   The budget is ``--keep`` of the pile's images or ``--keep-count`` images.

Outputs in ``--out``: ``list.txt`` (the kept files, absolute paths, one a line: a file list for
``pretrain --data``, ``embed``, ``shard``), ``exclude.txt`` (every dropped image as a deny-list:
``data.denylist=`` it to train on the kept images of a folder or shards in place; it also carries
the pile's own takedowns), ``decisions.csv``, ``curate.json`` (counts, settings, timings),
``report.html`` and, with ``--shards``, ``shards/`` written by the shard writer from ``list.txt``.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import time
from pathlib import Path

import numpy as np

from ..data.decode import DataError
from ..eval.typical import kmeans, kmeans_pp, water_fill  # noqa: F401 (curate's names, used by tests and select)
from ..fileio import atomic_write_json, atomic_write_text, csv_text, text_to_name, write_list

FORMAT = "openseer.curate.v1"
DUP_THRESHOLD = 0.95
NEIGHBOURS = 64  # neighbours searched per image for duplicate links
# a crop window links at no less than this cosine: on the bench's 28-pixel garments, windows at the
# 0.95 of whole images linked 19% more distinct images for 4% more copies; at 0.98 5% and 2%
WINDOW_THRESHOLD = 0.98
BLOCK = 1024  # query rows per faiss search
REFERENCE_QUANTILE = 0.01
BYTES_PER_FLOAT = 4
SHARDS_WANTED = 64  # --shards: split the kept images into this many shards ...
SHARD_MIN = 100  # ... of at least this many images


class CurateError(DataError):
    """A curation that cannot run as asked: what, and how to fix it."""


# ---------------------------------------------------------------- pure steps (tested with known answers)


def duplicate_groups(x: np.ndarray, threshold: float = DUP_THRESHOLD, k: int = NEIGHBOURS,
                     extra: tuple = (), search: str = "auto", info: dict | None = None,
                     extra_thresholds: tuple | None = None) -> np.ndarray:
    """Group id per row: each row is linked to those of its ``k`` nearest neighbours (faiss
    inner-product search on the normalised rows: exact below ``search.EXACT_MAX`` rows, IVF beyond,
    data/search.py ``choose_links_kind``; ``search`` forces a kind) with cosine >= ``threshold``; the connected
    components of those links (a group larger than ``k`` is still found, through chains) are then cut
    into stars (``_stars``), so that every member is within ``threshold`` of its group's seed and a
    chain of look-alikes (A ~ B ~ C, A !~ C) cannot sweep thousands of distinct images into one
    group. Rows of each ``extra`` matrix (e.g. the mirror images' descriptors, crop windows' descriptors;
    anything indexable by rows, converted a block at a time) query the same index for row i too. Ids
    are 0..G-1 in order of first row; singletons get their own. ``extra_thresholds``: a threshold per
    ``extra`` matrix (default ``threshold``). ``info`` (a dict) gets the search kind used (and the
    links as two row arrays when it holds ``want_links``)."""
    from ..data.search import VectorSearch, choose_links_kind

    n = len(x)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if search == "auto":
        search = choose_links_kind(n, queries=n * (1 + len(extra)), dim=x.shape[1] if x.ndim == 2 else 0)
    index = VectorSearch(x, kind=search)
    if info is not None:
        info["search"] = index.kind
    k = max(1, min(k, n))
    src, dst = [], []
    shifts = [0.0] + [threshold - t for t in (extra_thresholds or (threshold,) * len(extra))]
    for q, shift in zip((x, *extra), shifts):
        for s in range(0, n, BLOCK):
            sims, ids = index.knn(np.ascontiguousarray(q[s:s + BLOCK], dtype=np.float32), k)
            rows = np.repeat(np.arange(s, s + len(ids)), k)
            ok = (sims.ravel() + shift >= threshold) & (ids.ravel() >= 0)
            src.append(rows[ok])
            dst.append(ids.ravel()[ok])
    a = np.concatenate(src) if src else np.zeros(0, np.int64)
    b = np.concatenate(dst) if dst else np.zeros(0, np.int64)
    label = np.arange(n)
    while True:  # connected components: propagate the smallest label along the edges, then jump pointers
        old = label.copy()
        m = np.minimum(label[a], label[b])
        np.minimum.at(label, a, m)
        np.minimum.at(label, b, m)
        label = label[label]
        if np.array_equal(label, old):
            break
    if info is not None and info.get("want_links"):  # the links themselves (bench/curate_scale.py's recall)
        info["links"] = (a, b)
    degree = np.bincount(np.concatenate([a, b]), minlength=n) if len(a) else np.zeros(n, np.int64)
    label = _stars(x, extra, label, degree, threshold, shifts[1:])
    first: dict[int, int] = {}
    return np.array([first.setdefault(int(g), len(first)) for g in label], dtype=np.int64)


KMEANS_SAMPLE = 256  # rows per centroid that k-means trains on (faiss's default cap); all rows are assigned


def cluster(x: np.ndarray, k: int, seed: int = 0, per_centroid: int = KMEANS_SAMPLE) -> tuple[np.ndarray, np.ndarray]:
    """(centroids, assignment) of ``eval.typical.kmeans``, trained on a seeded sample of at most
    ``per_centroid`` rows a centroid, then every row assigned to its nearest centroid (faiss, exact).
    Below that many rows it is ``kmeans`` itself; at a million 256-d rows and 1,000 centroids the
    sample is a quarter of the work of clustering every row (and k-means' centroids barely move)."""
    import faiss

    k = max(1, min(k, len(x)))
    if len(x) <= k * per_centroid:
        return kmeans(x, k, seed=seed)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(x), k * per_centroid, replace=False))
    cents, _ = kmeans(x[sample], k, seed=seed)
    index = faiss.IndexFlatIP(cents.shape[1])
    index.add(np.ascontiguousarray(cents, dtype=np.float32))
    assign = np.empty(len(x), np.int64)
    for s in range(0, len(x), 65536):
        assign[s:s + 65536] = index.search(np.ascontiguousarray(x[s:s + 65536], dtype=np.float32), 1)[1][:, 0]
    return cents, assign


def _stars(x: np.ndarray, extra: tuple, label: np.ndarray, degree: np.ndarray,
           threshold: float, shifts: list[float] | None = None) -> np.ndarray:
    """Cut each connected component into stars: its best-linked member not yet taken is a seed, and
    every untaken member whose cosine to the seed is >= ``threshold`` joins it (either way round
    through the ``extra`` rows: the member's whole image against the seed's mirror image or crop
    window, or the member's against the seed's whole image, so a crop joins its original's star and
    an original its crop's); repeat until the component is used up. Exact cosines within the
    component, so a star is not limited to ``k`` neighbours. ``shifts``: added to each extra's cosines
    (a stricter threshold for it: ``threshold - its own``)."""
    out = label.copy()
    order = np.argsort(label, kind="stable")
    bounds = np.flatnonzero(np.diff(label[order])) + 1
    for members in np.split(order, bounds):
        if len(members) < 3:  # one link: already a star
            continue
        left = members[np.argsort(-degree[members], kind="stable")]
        while len(left):
            seed = left[0]
            sim = x[left] @ x[seed]
            for e, shift in zip(extra, shifts or [0.0] * len(extra)):
                sim = np.maximum(sim, x[left] @ np.asarray(e[seed], np.float32) + shift)
                sim = np.maximum(sim, np.asarray(e[left], np.float32) @ x[seed] + shift)
            take = sim >= threshold
            take[0] = True
            out[left[take]] = seed
            left = left[~take]
    return out


class _Mirrored:
    """Rows of a matrix of 16 x 16 descriptors, each mirrored left-right when read (the descriptor of
    the mirror image of the same window, up to resampling)."""

    def __init__(self, a: np.ndarray, side: int):
        self.a, self.side = a, side

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, i):
        v = np.asarray(self.a[i], np.float32)
        return v.reshape(*v.shape[:-1], self.side, self.side)[..., ::-1].reshape(v.shape)


def pile_duplicate_groups(pile: str, x: np.ndarray, index_rows: list[dict], dup_by: str = "descriptor",
                          threshold: float = DUP_THRESHOLD, progress: bool = False,
                          info: dict | None = None) -> np.ndarray:
    """``duplicate_groups`` of a pile's embedded rows (``x``, ``index_rows`` of an embed folder): by
    the near-copy descriptors of the pile's index (``descriptor``: data/index.py, built or brought up
    to date first; each image, its mirror image and its crop windows, so crops and flipped crops join
    their original), by the embeddings (``embedding``), or none (``none``: every row its own group).
    ``info`` (a dict) gets what was used: ``search`` (the faiss kind), ``windows`` (crop windows or not)."""
    info = {} if info is None else info
    if dup_by == "none":
        return np.arange(len(x), dtype=np.int64)
    if dup_by == "embedding":
        return duplicate_groups(x, threshold, info=info)
    return descriptor_groups(*pile_descriptors(pile, index_rows, progress), threshold, info)


def descriptor_groups(d: np.ndarray, f: np.ndarray, w: np.ndarray | None, threshold: float = DUP_THRESHOLD,
                      info: dict | None = None) -> np.ndarray:
    """``duplicate_groups`` by near-copy descriptors (data/nearcopy.py ``describe_pile_image``): each
    image whole (``d``), its mirror image (``f``) and, when given, its crop windows (``w``: n x windows
    x 256) and their mirror images against every other image whole, the windows at the stricter
    ``WINDOW_THRESHOLD``, so that crops and flipped crops join their original."""
    from ..data.nearcopy import SIDE

    info = {} if info is None else info
    extra: tuple = (f,)
    info["windows"] = w is not None
    if w is not None:
        wins = [w[:, i] for i in range(w.shape[1])]
        extra = (f, *wins, *[_Mirrored(v, SIDE) for v in wins])
    wt = max(threshold, WINDOW_THRESHOLD)
    return duplicate_groups(d, threshold, extra=extra, info=info,
                            extra_thresholds=(threshold,) + (wt,) * (len(extra) - 1))


def pile_descriptors(pile: str, index_rows: list[dict], progress: bool = False
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(descriptors, mirror images' descriptors, crop windows' descriptors or None) of each embedded
    row, from the pile's index (built or extended first); a pile that cannot have one (in memory,
    pipe: shards) is scanned, without windows. Flat images get zeros: never a duplicate by them."""
    from ..data.index import IndexMismatch, ensure_index
    from ..data.nearcopy import SIDE, WINDOWS, PileIndex

    try:
        pix = ensure_index(pile, progress=progress, log=lambda t: None)
    except IndexMismatch:
        pix = PileIndex(pile, progress=progress, flips=True)
    where = {k: i for i, k in enumerate(pix.keys)}
    if hasattr(pix, "rows_of"):  # the index's snapshot: each array read from the parts once, in row order
        idx = np.array([where.get(r["key"], -1) for r in index_rows], np.int64)
        return pix.rows_of("vectors", idx), pix.rows_of("flipped", idx), pix.rows_of("windows", idx)
    wins = pix.windows if not isinstance(pix, PileIndex) else None
    d = np.zeros((len(index_rows), SIDE * SIDE), np.float32)
    f = np.zeros((len(index_rows), SIDE * SIDE), np.float32)
    w = np.zeros((len(index_rows), len(WINDOWS), SIDE * SIDE), np.float16) if wins is not None else None
    for i, r in enumerate(index_rows):
        j = where.get(r["key"])
        if j is not None:
            d[i], f[i] = pix.vectors[j], pix.flipped[j]
            if w is not None:
                w[i] = wins[j]
    return d, f, w


def pile_quality(pile: str, index_rows: list[dict]) -> np.ndarray:
    """(pixel count, file bytes) of each embedded row, to keep the best copy of a duplicate group: from
    the pile's index when it is up to date, else read from the files' headers (shards: their
    manifest.csv); zeros where unknown (then the group keeps its most typical member)."""
    import csv

    from ..data.collection import open_collection
    from ..data.index import IndexMismatch, open_index

    q = np.zeros((len(index_rows), 2), np.int64)
    try:
        pix = open_index(pile)
    except (IndexMismatch, DataError):
        pix = None
    if pix is not None:
        where = {k: i for i, k in enumerate(pix.keys)}
        for i, r in enumerate(index_rows):
            j = where.get(r["key"])
            if j is not None:
                q[i] = pix.pixels[j], pix.nbytes[j]
        return q
    coll = open_collection(pile)
    if coll.kind == "files":
        from PIL import Image

        from ..fileio import text_to_name

        for i, r in enumerate(index_rows):
            try:
                path = text_to_name(r["path"])
                with Image.open(path) as im:
                    q[i] = im.width * im.height, os.stat(path).st_size
            except Exception:  # unreadable now: unknown
                continue
    elif coll.kind == "shards" and getattr(coll, "manifest_path", None) is not None:
        with open(coll.manifest_path, newline="", encoding="utf-8", errors="replace") as fh:
            sizes = {row["key"]: (int(row["width"] or 0) * int(row["height"] or 0), int(row["bytes"] or 0))
                     for row in csv.DictReader(fh)}
        for i, r in enumerate(index_rows):
            q[i] = sizes.get(r["key"], (0, 0))
    return q


def group_representatives(x: np.ndarray, groups: np.ndarray, quality: np.ndarray | None = None) -> np.ndarray:
    """Per row, whether it is its group's kept image: the best copy by ``quality`` (rows of (pixel
    count, file bytes): the largest, then the least compressed), ties (or no ``quality``) broken by
    the member nearest the group's mean direction (the most typical copy)."""
    keep = np.zeros(len(groups), dtype=bool)
    order = np.argsort(groups, kind="stable")
    bounds = np.flatnonzero(np.diff(groups[order])) + 1
    for members in np.split(order, bounds):
        if len(members) == 1:
            keep[members[0]] = True
            continue
        if quality is not None:
            qm = quality[members]
            best = (qm[:, 0] == qm[:, 0].max())
            best &= qm[:, 1] == qm[best, 1].max()
            members = members[best]
            if len(members) == 1:
                keep[members[0]] = True
                continue
        mean = x[members].mean(axis=0)
        keep[members[int(np.argmax(x[members] @ mean))]] = True
    return keep


def balanced_sample(assign: list[np.ndarray], budget: int, seed: int = 0) -> np.ndarray:
    """Rows kept by balanced sampling over a cluster hierarchy.

    ``assign[0]`` is the leaf cluster of each row; ``assign[l]`` (l >= 1) the level-l cluster of each
    row (each coarser level groups whole clusters of the level below). The budget is water-filled over
    the top level's clusters, then within each over its sub-clusters, down to the leaves, which give
    random members (seeded). Returns a boolean mask.
    """
    rng = np.random.default_rng(seed)
    n = len(assign[0])
    keep = np.zeros(n, dtype=bool)

    def take(rows: np.ndarray, level: int, k: int) -> None:
        if k <= 0 or len(rows) == 0:
            return
        if level < 0:
            keep[rng.choice(rows, size=min(k, len(rows)), replace=False)] = True
            return
        labels = assign[level][rows]
        ids, inv = np.unique(labels, return_inverse=True)
        members = [rows[inv == i] for i in range(len(ids))]
        for m, t in zip(members, water_fill([len(m) for m in members], k)):
            take(m, level - 1, t)

    take(np.arange(n), len(assign) - 1, budget)
    return keep


def reference_threshold(ref: np.ndarray, quantile: float = REFERENCE_QUANTILE) -> float:
    """The cosine a pile image must reach to its nearest reference image to count as in-domain: the
    ``quantile`` of the reference's own leave-one-out nearest-neighbour similarities."""
    import faiss

    ref = np.ascontiguousarray(ref, dtype=np.float32)
    if len(ref) < 2:
        raise CurateError("--reference needs at least 2 good images")
    index = faiss.IndexFlatIP(ref.shape[1])
    index.add(ref)
    sims, _ = index.search(ref, 2)
    return float(np.quantile(sims[:, 1], quantile))


def nearest_similarity(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Each row's best cosine to the reference rows (faiss flat inner-product search)."""
    import faiss

    index = faiss.IndexFlatIP(ref.shape[1])
    index.add(np.ascontiguousarray(ref, dtype=np.float32))
    sims, _ = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return sims[:, 0]


# ---------------------------------------------------------------- memory


def available_memory() -> int:
    """Bytes of memory available now (MemAvailable), or the physical size where that is unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_needed(n: int, dim: int, clusters: int, dup_by: str = "descriptor") -> int:
    """Peak bytes the index steps need: the embeddings in RAM twice (float32 rows + the faiss copy),
    with ``dup_by`` descriptor the pile index's descriptors (whole, mirrored, windows), the
    duplicate links (up to NEIGHBOURS per image: two int64 ids), a BLOCK x N score block when the
    search is exhaustive, an approximate search's own structure (IVF lists: beyond exact search,
    ``search.choose_links_kind``), k-means' centroids and the per-row bookkeeping."""
    rows = n * dim * BYTES_PER_FLOAT
    from ..data.nearcopy import WINDOWS
    from ..data.search import choose_links_kind
    from ..data.search import memory_bytes as search_bytes

    descriptor = dup_by == "descriptor"
    # --dup-by descriptor: the pile's, its mirrors', the index's (float32) and its crop windows' (float16)
    descriptors = 3 * n * 256 * BYTES_PER_FLOAT + n * len(WINDOWS) * 256 * 2 if descriptor else 0
    d = max(dim, 256) if descriptor else dim
    kind = choose_links_kind(n, queries=n * (1 + 1 + 2 * len(WINDOWS) if descriptor else 1), dim=d)
    structure = search_bytes(n, d, kind) - n * d * BYTES_PER_FLOAT
    block = BLOCK * n * BYTES_PER_FLOAT if kind == "flat" else 0
    return (2 * rows + descriptors + structure + 2 * n * min(n, NEIGHBOURS) * 16 + block
            + clusters * dim * BYTES_PER_FLOAT + 64 * n)


def _gb(b: float) -> str:
    return f"{b / 2**30:.2f} GB" if b >= 2**27 else f"{b / 2**20:.1f} MB"


# ---------------------------------------------------------------- the job


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CurateError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "curate.json").is_file() and not (out / "embed").is_dir():
        raise CurateError(f"--out {out} is not empty and holds no openseer curation; choose another folder")


def curate(pile: str, out: str | Path, model_spec: str, keep: float | None = 0.5, keep_count: int = 0,
           dup_threshold: float = DUP_THRESHOLD, clusters: int = 0, levels: int = 1, reference: str = "",
           drop_off_domain: bool = False, dup_by: str = "descriptor", seed: int = 0, shards: bool = False, batch_size: int = 64,
           workers: int = 0, device: str = "cpu", layer: str = "last", max_memory: int = 0,
           progress: bool = True, log=print, embeddings: str = "") -> dict | None:
    """Curate ``pile`` into ``out`` (see the module docstring); returns what ``curate.json`` holds
    (None on a torchrun rank other than 0, which only helps embed).

    Every check that can fail (settings, the pile, the model, the memory estimate) runs before
    anything is written.
    """
    from ..data.collection import open_collection
    from .embed import embed_pile, reason_counts, reuse_embeddings

    t0 = time.perf_counter()
    out = Path(out).expanduser()
    if keep_count:
        if keep_count < 1:
            raise CurateError(f"--keep-count must be >= 1; got {keep_count}")
        keep = None
    elif keep is None or not (0 < keep <= 1):
        raise CurateError(f"--keep must be in (0, 1] (a share of the pile); got {keep}")
    if not (0 < dup_threshold <= 1):
        raise CurateError(f"--dup-threshold must be in (0, 1] (a cosine similarity); got {dup_threshold}")
    if dup_by not in ("embedding", "descriptor"):
        raise CurateError(f"--dup-by must be 'embedding' or 'descriptor'; got {dup_by!r}")
    if levels not in (1, 2, 3):
        raise CurateError(f"--levels must be 1, 2 or 3; got {levels}")
    _check_out(out)
    coll = open_collection(pile)  # an empty or missing pile fails here, with its message
    if coll.n == 0:
        raise CurateError(f"the pile {pile} holds no images")
    if keep_count and keep_count > coll.n:
        raise CurateError(f"--keep-count {keep_count} is more than the pile holds ({coll.n} images)")
    budget = keep_count or max(1, round(keep * coll.n))  # type: ignore[operator]
    from .api import load

    model = load(model_spec, device=device, layer=layer)
    k = clusters or max(2, min(4096, round(math.sqrt(coll.n))))
    need = memory_needed(coll.n, model.feature_dim, k, dup_by)
    have = max_memory or available_memory()
    if need > have:
        raise CurateError(f"the index steps for {coll.n} images x {model.feature_dim}-d embeddings need about "
                          f"{_gb(need)} of memory and {_gb(have)} is available: curate the pile in parts "
                          f"(e.g. a file list per part), or use a model with smaller features (--layer)")

    log(f"openseer: curating {coll.description} with {model.arch} ({model.feature_dim}-d): keep {budget} images")
    t_embed = time.perf_counter()
    # under torchrun the ranks share both embedding passes; the rest is rank 0's (the others return None)
    if embeddings:  # an `openseer embed` folder of this pile and model: read, not embedded again
        from .ranks import open_ranks

        log(f"openseer: reading the embeddings in {embeddings} (made by `openseer embed` with this model)")

        embedded = reuse_embeddings(embeddings, model, pile) if open_ranks(model.device).is_main else None
    else:
        embedded = embed_pile(model, pile, out / "embed", batch_size=batch_size, workers=workers,
                              progress=progress, every_rank=False)
    ref_embedded = embed_pile(model, reference, out / "reference", batch_size=batch_size, workers=workers,
                              progress=progress, every_rank=False) if reference else None
    if embedded is None:
        return None
    x, index_rows, bad = embedded
    out.mkdir(parents=True, exist_ok=True)  # embed_pile made it; --embeddings did not
    embed_s = time.perf_counter() - t_embed
    n = len(x)
    if n == 0:
        raise CurateError(f"no image of {pile} could be decoded ({len(bad)} bad): see {out / 'embed' / 'bad.csv'}")

    t1 = time.perf_counter()
    dup_info: dict = {}
    groups = pile_duplicate_groups(pile, x, index_rows, dup_by, dup_threshold, progress, info=dup_info)
    rep = group_representatives(x, groups, pile_quality(pile, index_rows))
    dup_s = time.perf_counter() - t1

    offdomain = np.zeros(n, dtype=bool)
    ref_info: dict = {"given": False}
    ref_sim = np.full(n, np.nan, dtype=np.float32)
    if reference:
        ref = ref_embedded[0]
        th = reference_threshold(ref)
        ref_sim = nearest_similarity(x, ref)
        offdomain = ref_sim < th
        ref_info = {"given": True, "data": reference, "images": len(ref), "threshold": round(th, 4),
                    "quantile": REFERENCE_QUANTILE}

    candidates = rep & ~(offdomain if drop_off_domain else np.zeros(n, dtype=bool))
    cand_rows = np.flatnonzero(candidates)
    t2 = time.perf_counter()
    assign_all = np.full(n, -1, dtype=np.int64)
    k = min(k, max(1, len(cand_rows)))
    hier: list[np.ndarray] = []
    if len(cand_rows):
        cents, a0 = cluster(x[cand_rows], k, seed=seed)
        hier = [a0]
        for _ in range(levels - 1):  # hierarchical: cluster the centroids of the level below
            ck = max(1, round(math.sqrt(len(cents))))
            cents, ca = kmeans(cents, ck, seed=seed)
            hier.append(ca[hier[-1]])
        assign_all[cand_rows] = a0
        # every image (also dropped ones) gets its nearest leaf cluster, for the report
        import faiss

        leaf = faiss.IndexFlatIP(x.shape[1])
        leaf.add(_leaf_centroids(x[cand_rows], a0))
        _, nearest = leaf.search(x, 1)
        assign_all = nearest[:, 0].astype(np.int64)
        assign_all[cand_rows] = a0
    picked = balanced_sample(hier, budget, seed=seed) if len(cand_rows) else np.zeros(0, bool)
    kept = np.zeros(n, dtype=bool)
    kept[cand_rows[picked]] = True
    cluster_s = time.perf_counter() - t2

    # ---- decisions
    keys = [r["key"] for r in index_rows]
    paths = [r["path"] for r in index_rows]
    group_rep = {int(g): i for i, g in enumerate(groups) if rep[i]}
    sizes = np.bincount(groups)
    decisions: list[list] = []
    reasons: dict[str, int] = {}
    for i in range(n):
        if kept[i]:
            why = "kept"
        elif not rep[i]:
            why = "duplicate"
        elif drop_off_domain and offdomain[i]:
            why = "off_domain"
        else:
            why = "balanced_out"
        reasons[why] = reasons.get(why, 0) + 1
        g = int(groups[i])
        decisions.append([keys[i], paths[i], g if sizes[g] > 1 else "", keys[group_rep[g]] if why == "duplicate" else "",
                          int(assign_all[i]), "yes" if kept[i] else "no", why,
                          "" if np.isnan(ref_sim[i]) else f"{ref_sim[i]:.4f}", "yes" if offdomain[i] else ""])
    bad_reasons = reason_counts(b["reason"] for b in bad)
    for b in bad:
        decisions.append([b["key"], b["path"], "", "", "", "no", f"bad:{b['reason'].split(':')[0]}", "", ""])
    n_kept = int(kept.sum())

    before = np.bincount(assign_all[assign_all >= 0], minlength=k) if n else np.zeros(k, int)
    after = np.bincount(assign_all[kept], minlength=k) if n_kept else np.zeros(k, int)
    summary = {
        "format": FORMAT, "pile": coll.description, "pile_spec": pile, "model": model_spec, "arch": model.arch,
        "embeddings_from": str(embeddings) if embeddings else "embedded here (embed/)",
        "feature_dim": model.feature_dim, "layer": model.layer, "inputs": coll.n, "decoded": n, "bad": len(bad),
        "bad_by_reason": bad_reasons, "budget": budget, "keep": keep, "keep_count": keep_count or None,
        "kept": n_kept, "decisions": reasons, "dup_threshold": dup_threshold, "dup_by": dup_by,
        "duplicate_groups": int((sizes > 1).sum()), "images_in_duplicate_groups": int(sizes[sizes > 1].sum()),
        "largest_group": int(sizes.max()) if len(sizes) else 0, "clusters": int(len(np.unique(hier[0]))) if hier else 0,
        "levels": levels, "cluster_sizes_before": sorted(before.tolist(), reverse=True),
        "cluster_sizes_after": sorted(after.tolist(), reverse=True),
        "off_domain": {**ref_info, "found": int(offdomain.sum()) if reference else None,
                       "share": round(float(offdomain.mean()), 4) if reference else None,
                       "dropped": bool(drop_off_domain and reference)},
        "duplicate_method": duplicate_method(dup_by, dup_threshold, dup_info), "memory_estimate_bytes": need, "seed": seed,
        "seconds": {"embed": round(embed_s, 1), "duplicates": round(dup_s, 1), "clusters": round(cluster_s, 1)},
    }
    if summary["largest_group"] > n / 2:
        summary["warning"] = (f"one duplicate group holds {summary['largest_group']} of {n} images: the model maps "
                              f"most of the pile close together (random weights?); use a trained model or raise "
                              f"--dup-threshold")
    if n_kept < budget:
        summary["note"] = (f"{n_kept} images kept, fewer than the {budget} asked: that is all that remained after "
                           f"dropping duplicates" + (" and off-domain images" if drop_off_domain else ""))

    # ---- files (each written atomically)
    kept_paths = [paths[i] for i in np.flatnonzero(kept)]
    from ..data.collection import open_denylist

    pile_root = Path(pile) if Path(pile).is_dir() else None
    pile_deny = open_denylist("", pile_root) if coll.kind == "files" else coll.deny
    excluded = [keys[i] for i in range(n) if not kept[i]] + [b["key"] for b in bad]
    listable = [k for k in excluded if "\n" not in k and "\r" not in k and "\t" not in k]
    summary["unlistable"] = len(excluded) - len(listable)  # a deny-list line cannot hold these names
    header = ("# openseer curate: the images this curation dropped (and the pile's own takedowns), as a deny-list;\n"
              "# train on the kept images in place with data.denylist=THIS_FILE\n")
    atomic_write_text(out / "exclude.txt", header + "".join(f"{k}\n" for k in list(pile_deny.keys) + listable))
    write_list(out / "list.txt", [_absolute(text_to_name(p)) for p in kept_paths])  # any name, read back exactly
    atomic_write_text(out / "decisions.csv", csv_text(decisions, ["key", "path", "group", "duplicate_of", "cluster",
                                                                     "kept", "decision", "reference_similarity",
                                                                     "off_domain"]))
    if shards:
        if coll.kind != "files":
            summary["shards"] = "not written: --shards needs a folder or file-list pile (use exclude.txt for shards)"
        else:
            from ..data.shards import write_shards

            # enough shards for several ranks x loader workers (each needs one per pass), <= 10,000 images each
            size = min(10000, max(SHARD_MIN, -(-len(kept_paths) // SHARDS_WANTED)))
            info = write_shards(out / "list.txt", out / "shards", shard_size=size)
            summary["shards"] = {"folder": str(out / "shards"), "images": info["total"], "shards": len(info["shards"])}
    summary["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    summary["files"] = {name: str(out / name) for name in ("list.txt", "exclude.txt", "decisions.csv", "report.html")}
    write_html(out / "report.html", summary, groups, sizes, paths, coll, index_rows, kept)
    atomic_write_json(out / "curate.json", summary)
    return summary


def duplicate_method(dup_by: str, threshold: float, info: dict) -> str:
    """How the duplicate groups were found and which member each keeps, in words (curate.json, report);
    ``info``: what ``pile_duplicate_groups`` reported it used."""
    from ..data.nearcopy import WINDOWS

    search = {"flat": "exact", "hnsw": "approximate (HNSW)", "ivf": "approximate (IVF-flat)"}.get(
        info.get("search", ""), "")
    if dup_by == "none":
        return "No duplicate search (--dup-by none): every image is its own group."
    if dup_by == "descriptor":
        windows = (f", of its mirror image's, or (at >= {max(threshold, WINDOW_THRESHOLD)}) of one of its "
                   f"{len(WINDOWS)} crop windows' (and their mirror images')" if info.get("windows") else " or of its mirror image's (no crop windows: a pile "
                   "without an index)")
        what = (f"By near-copy descriptor (--dup-by descriptor: 16 x 16 grey"
                f"{', from the pile index' if info.get('windows') else ''}): an image is linked to another when the "
                f"cosine of their descriptors{windows} against the other's whole image is >= {threshold}")
    else:
        what = (f"By embedding (--dup-by embedding): an image is linked to another when their normalised embeddings "
                f"have a cosine >= {threshold}")
    return (f"{what}, among its {NEIGHBOURS} nearest neighbours ({search} faiss search); linked images are cut "
            f"into stars around seeds, every member within the threshold of its seed. Each group keeps its "
            f"largest copy (pixel count, then file size), the one nearest the group's mean on a tie.")


def _leaf_centroids(x: np.ndarray, assign: np.ndarray) -> np.ndarray:
    k = int(assign.max()) + 1
    c = np.zeros((k, x.shape[1]), dtype=np.float64)
    np.add.at(c, assign, x)
    c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    return c.astype(np.float32)


def _absolute(p: str) -> str:
    return p if "#" in p and not Path(p).exists() else str(Path(p).resolve())


# ---------------------------------------------------------------- report


def _thumb(coll, row: dict, side: int = 64) -> str:
    """A data: URI PNG of one pile image (decoded again), or '' when it cannot be read."""
    from PIL import Image

    try:
        if coll.kind == "files":
            from ..data.decode import load_image

            img = load_image(row["path"], draft_size=side)
        elif coll.in_memory:
            img = Image.fromarray(coll.images[int(row["key"].rsplit(":", 1)[-1]), 0].numpy())
        else:
            return ""
    except Exception:
        return ""
    img = img.convert("RGB")
    img.thumbnail((side, side), Image.Resampling.NEAREST if max(img.size) < side else Image.Resampling.BILINEAR)
    if max(img.size) < side:
        f = side / max(img.size)
        img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _bars(before: list[int], after: list[int], width: int = 720, height: int = 160) -> str:
    """Inline SVG: cluster sizes before (grey) and after (blue), clusters sorted by size before."""
    order = np.argsort(-np.asarray(before))
    b = np.asarray(before)[order]
    a = np.asarray(after)[order]
    top = max(1, int(b.max()) if len(b) else 1)
    w = width / max(1, len(b))
    parts = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">']
    for i, (vb, va) in enumerate(zip(b, a)):
        hb, ha = height * vb / top, height * va / top
        parts.append(f'<rect x="{i * w:.2f}" y="{height - hb:.2f}" width="{max(w, 0.5):.2f}" height="{hb:.2f}" '
                     f'fill="#bbb"/>')
        parts.append(f'<rect x="{i * w:.2f}" y="{height - ha:.2f}" width="{max(w, 0.5):.2f}" height="{ha:.2f}" '
                     f'fill="#36c"/>')
    parts.append("</svg>")
    return "".join(parts)


def write_html(path: Path, summary: dict, groups: np.ndarray, sizes: np.ndarray, paths: list[str], coll,
               index_rows: list[dict], kept: np.ndarray, n_groups: int = 8, per_group: int = 10) -> None:
    """One self-contained page: counts, duplicate groups as thumbnails, cluster sizes, off-domain share."""
    e = html.escape
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups.tolist()):
        if sizes[g] > 1:
            members.setdefault(g, []).append(i)
    largest = sorted(members, key=lambda g: -sizes[g])[:n_groups]
    rows_html = []
    for g in largest:
        cells = []
        for i in members[g][:per_group]:
            uri = _thumb(coll, index_rows[i])
            border = "3px solid #2a2" if kept[i] else "3px solid #fff"
            tip = e(f"{index_rows[i]['key']} ({'kept' if kept[i] else 'dropped'})")
            cells.append(f'<img src="{uri}" title="{tip}" style="border:{border};margin:1px" width="64">' if uri
                         else f'<span title="{tip}">[{tip}]</span>')
        rows_html.append(f"<tr><td>{int(sizes[g])}</td><td>{''.join(cells)}</td></tr>")
    od = summary["off_domain"]
    if od.get("given"):
        od_html = (f"<p><b>{100 * od['share']:.1f}%</b> of the decoded pile ({od['found']} images) is off-domain. "
                   f"Estimated against the reference <code>{e(str(od['data']))}</code> ({od['images']} images): an "
                   f"image is off-domain when its best cosine similarity to any reference image is below "
                   f"{od['threshold']}, the {100 * od['quantile']:g}% quantile of the reference images' similarity "
                   f"to their own nearest other reference image (leave-one-out). "
                   f"{'They were dropped.' if od['dropped'] else 'They were kept (pass --drop-off-domain to drop them).'}</p>")
    else:
        od_html = ("<p>Not estimated: off-domain needs a sample of the wanted domain (<code>--reference DATA</code>); "
                   "an image is then off-domain when it is farther from every reference image than 99% of the "
                   "reference images are from their nearest neighbour.</p>")
    counts = "".join(f"<tr><td>{e(k)}</td><td>{v}</td></tr>" for k, v in sorted(summary["decisions"].items()))
    bads = "".join(f"<tr><td>bad: {e(k)}</td><td>{v}</td></tr>" for k, v in sorted(summary["bad_by_reason"].items()))
    before, after = summary["cluster_sizes_before"], summary["cluster_sizes_after"]
    nz = [a for a in after if a]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>openseer curate</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}td{{padding:2px 8px;vertical-align:top}}
table{{border-collapse:collapse}}tr:nth-child(even){{background:#f4f4f4}}</style></head><body>
<h1>Curation of {e(summary['pile'])}</h1>
<p>Model {e(summary['model'])} ({e(summary['arch'])}, {summary['feature_dim']}-d {e(summary['layer'])} features).
{summary['inputs']} inputs, {summary['decoded']} decoded, {summary['bad']} bad; kept <b>{summary['kept']}</b>
(budget {summary['budget']}). {e(summary.get('note', ''))}</p>
<table>{counts}{bads}</table>
<h2>Near-duplicates</h2>
<p>{summary['duplicate_groups']} groups holding {summary['images_in_duplicate_groups']} images; the largest has
{summary['largest_group']}. {e(summary['duplicate_method'])} The largest groups (green border: kept by the
final sampling):</p>
<table><tr><th>size</th><th>members</th></tr>{''.join(rows_html)}</table>
<h2>Clusters</h2>
<p>{summary['clusters']} k-means clusters ({summary['levels']} level(s)); sizes before (grey: every decoded
image, by nearest centroid) and after (blue: kept), largest first. Before: largest {before[0] if before else 0},
median {int(np.median(before)) if before else 0}; after: largest {max(after) if after else 0},
median of non-empty {int(np.median(nz)) if nz else 0}.</p>
{_bars(before, after)}
<h2>Off-domain share</h2>
{od_html}
<p>Files: list.txt (kept), exclude.txt (dropped, as a deny-list), decisions.csv (every image), curate.json.</p>
</body></html>
"""
    atomic_write_text(path, page)
