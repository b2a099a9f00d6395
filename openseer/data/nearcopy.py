"""Near-copy detection for takedowns: find re-encoded, resized, cropped and flipped copies of a photo.

An exact takedown matches the content hash, so a copy saved again at another JPEG quality, size or
crop still reaches the model. This module matches such copies with a hand-made descriptor (no
pretrained weights are needed, and none can be downloaded here), copy-detection style:

* **Descriptor.** An image is turned grey (float levels, never rounded: a dark or near-flat photo's
  structure can be a few levels deep), area-resampled to ``SIDE x SIDE`` pixels, its mean removed
  and its norm set to 1. Re-encoding (even JPEG quality 30) and resizing (a quarter of the side)
  barely move a 16 x 16 area average, so two copies have a cosine similarity near 1; blank images
  (below ``MIN_STD`` grey levels of spread) get no descriptor and never match.
* **The query side is multi-crop.** A copy that keeps >= 70% of the area is some window of the
  original with both sides >= 70%; the photo being taken down is described at a grid of such
  windows (widths and heights ``0.7 .. 1`` with their positions, ``CROP_STEP`` apart) and at their
  mirror images, so one of its descriptors lines up with any such crop (flipped or not). A pile
  image is described once, whole.
* **Matching** is a faiss inner-product range search of the query's descriptors over the pile's
  (normalised vectors, so inner product = cosine) with threshold ``THRESHOLD``, then a check of
  each candidate: the 32 x 32 high-pass detail of candidate and window must correlate (``VERIFY``,
  with a local search over the window's position and size); where neither has detail (smooth
  gradients, near-flat pictures) the 16 x 16 descriptor, refined the same way, must agree closely
  (``FLAT_THRESHOLD``). The thresholds and the grid were chosen by ``bench/nearcopy.py``: recall
  and false matches on copies of real photographs against 12,000 distinct images, detail-free and
  near-blank ones among them (numbers in docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

SIDE = 16  # descriptor resolution: 256 numbers
MIN_STD = 0.5  # grey levels of 16 x 16 spread: flatter images (blank) are not described, so never matched
THRESHOLD = 0.80  # descriptor cosine similarity of a candidate (see bench/nearcopy.py)
MIN_SIDE = 0.70  # the grid covers windows whose sides keep >= 70% (every crop keeping >= 70% of the area)
CROP_STEP = 0.05  # grid step of window sides and positions, as a fraction of the image side
# what a stored descriptor depends on (data/index.py refuses an index built with another)
DESCRIPTOR_VERSION = "grey-box16-f32.v1+read292+prep256+win10"


def _grey(img: Image.Image) -> Image.Image:
    """Grey levels as 32-bit floats: no rounding to whole levels, which would drown the faint
    structure of a dark or near-flat photo (a 3-level gradient under its 0.5-level rounding noise)."""
    if img.mode == "F":
        return img
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    return img.convert("F")


def _vector(img: Image.Image, box: tuple[float, float, float, float] | None = None) -> np.ndarray | None:
    """Resampled grey levels (of ``box`` in the image, or all of it) -> a zero-mean unit vector, or
    None for a flat image."""
    x = np.asarray(_grey(img).resize((SIDE, SIDE), Image.Resampling.BOX, box=box), dtype=np.float32).ravel()
    x = x - x.mean()
    if float(x.std()) < MIN_STD:
        return None
    return x / float(np.linalg.norm(x))


def prepare_image(img: Image.Image, max_side: int = 256) -> Image.Image:
    """Grey, and box-reduced to at most ``max_side`` (descriptors need few pixels; big photos are slow)."""
    img = _grey(img)
    f = max(img.size) / max_side
    if f >= 2:
        img = img.reduce(int(f))
    return img


def describe(img: Image.Image) -> np.ndarray | None:
    """The descriptor of a whole image (a pile image), float32 (SIDE*SIDE,), or None when flat."""
    return _vector(prepare_image(img))


# windows of each pile image stored in the index beside its whole descriptor, so that ``curate``
# links an image to its crops (centre 90%; 80% of each side at 3 x 3 positions): (left, top, w, h)
WINDOWS = [(0.05, 0.05, 0.9, 0.9)] + [(x, y, 0.8, 0.8) for y in (0.0, 0.1, 0.2) for x in (0.0, 0.1, 0.2)]


def describe_pile_image(img: Image.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """What the index stores of a pile image: its descriptor, its mirror image's (the mirrored
    vector where the mirror image is flat) and the descriptors of ``WINDOWS`` (zeros where flat),
    or None when the image is flat."""
    prep = prepare_image(img)
    v = _vector(prep)
    if v is None:
        return None
    fv = describe(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    if fv is None:  # a borderline-flat image can be flat one way round: then mirror the vector
        fv = v.reshape(SIDE, SIDE)[:, ::-1].ravel().copy()
    W, H = prep.size
    wins = np.zeros((len(WINDOWS), SIDE * SIDE), np.float32)
    for i, (x, y, w, h) in enumerate(WINDOWS):
        wv = _vector(prep, (x * W, y * H, (x + w) * W, (y + h) * H))
        if wv is not None:
            wins[i] = wv
    return v, fv, wins


def _grid() -> list[tuple[float, float, float, float]]:
    """Windows (left, top, width, height) in fractions of the side: sides >= MIN_SIDE, on a CROP_STEP grid."""
    n = round((1 - MIN_SIDE) / CROP_STEP)
    sides = [1 - i * CROP_STEP for i in range(n + 1)]
    out = []
    for w in sides:
        for h in sides:
            if w * h < MIN_SIDE - 1e-9:
                continue
            xs = [i * CROP_STEP for i in range(round((1 - w) / CROP_STEP) + 1)]
            ys = [i * CROP_STEP for i in range(round((1 - h) / CROP_STEP) + 1)]
            out += [(x, y, w, h) for x in xs for y in ys]
    return out


GRID = _grid()


FINE = 32  # verification resolution
FINE_MIN = 1.5  # grey levels of high-pass spread: below it a window has no detail to verify
_K = np.array([1, 4, 6, 4, 1], np.float32) / 16


def _blur_matrix(n: int) -> np.ndarray:
    """B with ``B @ x`` = x blurred along its first axis by ``_K``, reflect-padded (as np.pad 'reflect')."""
    b = np.zeros((n, n), np.float64)
    for i in range(n):
        for k in range(5):
            j = i + k - 2
            j = -j if j < 0 else 2 * (n - 1) - j if j >= n else j
            b[i, j] += _K[k]
    return b.astype(np.float32)


_B = _blur_matrix(FINE)


def _highpass(x: np.ndarray) -> np.ndarray:
    """x minus a separable binomial blur of it (reflect-padded): the detail a copy keeps. Two small
    matrix products (the blur and its padding baked into ``_B``): the verification's inner loop."""
    if x.shape == (FINE, FINE):
        return x - _B @ x @ _B.T
    p = np.pad(x, 2, mode="reflect")
    b = sum(_K[i] * p[:, i:i + x.shape[1]] for i in range(5))
    b = sum(_K[i] * b[i:i + x.shape[0], :] for i in range(5))
    return x - b


def fine(img: Image.Image, box: tuple[float, float, float, float] | None = None) -> np.ndarray | None:
    """The verification descriptor of an image (or of ``box`` in it): 32 x 32 grey high-pass, unit norm."""
    x = np.asarray(img.resize((FINE, FINE), Image.Resampling.BOX, box=box), dtype=np.float32)
    x = _highpass(x).ravel()
    x -= x.mean()
    if float(x.std()) < FINE_MIN:
        return None
    return x / float(np.linalg.norm(x))


@dataclass
class Query:
    """A photo to take down: its grey views (as is, mirrored) and one descriptor per grid window."""

    views: tuple[Image.Image, Image.Image]
    vectors: np.ndarray  # (M, SIDE*SIDE)
    windows: list[tuple[int, tuple[float, float, float, float]]]  # per row: (view, window)
    # the descriptors of view boxes the local search visited, kept across candidates (the same box of
    # the same view is described once per query, however many candidates visit it)
    cache: dict = field(default_factory=dict, repr=False)

    def verify(self, row: int, candidate: Image.Image) -> tuple[float, bool]:
        """(score, flat) of a candidate against query window ``row``. The score is the best high-pass
        correlation of the two, refined by a local search over the window's position and size (the
        grid is CROP_STEP apart; a real crop falls between): coordinate steps of CROP_STEP / 2,
        halved twice. When neither has detail to compare (smooth gradients, near-flat pictures),
        ``flat`` is True and the score is the 16 x 16 descriptor's cosine, refined the same way; a
        candidate without detail against a window with detail scores -1."""
        cand = prepare_image(candidate)
        target = fine(cand)
        view_i, window = self.windows[row]
        view = self.views[view_i]
        W, H = view.size

        def pixels(b: tuple[float, float, float, float]) -> tuple[float, float, float, float] | None:
            x0, y0, x1, y1 = max(0.0, b[0]), max(0.0, b[1]), min(1.0, b[0] + b[2]), min(1.0, b[1] + b[3])
            return None if x1 - x0 < 0.05 or y1 - y0 < 0.05 else (x0 * W, y0 * H, x1 * W, y1 * H)

        if target is None:  # no detail to compare: only a detail-free window can be its original
            ref, describe = _vector(cand), _vector
            if ref is None or fine(view, pixels(window)) is not None:
                return -1.0, True
        else:
            ref, describe = target, fine

        def corr(b: tuple[float, float, float, float]) -> float:
            box = pixels(b)
            if box is None:
                return -1.0
            key = (view_i, describe is fine, box)
            if key not in self.cache:
                self.cache[key] = describe(view, box)
            v = self.cache[key]
            return -1.0 if v is None else float(v @ ref)

        return _local_search(corr, window), target is None


def _local_search(score, box: tuple[float, float, float, float]) -> float:
    """The best ``score(window)`` by coordinate steps of CROP_STEP / 2 around ``box``, halved twice."""
    best = score(box)
    step = CROP_STEP / 2
    for _ in range(3):
        moved = True
        while moved:
            moved = False
            for k in range(4):
                for sign in (-1, 1):
                    b = list(box)
                    b[k] += sign * step
                    c = score(tuple(b))
                    if c > best:
                        best, box, moved = c, tuple(b), True
        step /= 2
    return best


def describe_query(img: Image.Image) -> Query:
    """A photo to take down, described at every window of the grid and at its mirror image."""
    img = prepare_image(img, max_side=512)
    views = (img, img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    rows, windows = [], []
    for i, view in enumerate(views):
        W, H = view.size
        for x, y, w, h in GRID:
            box = (x * W, y * H, (x + w) * W, (y + h) * H)
            v = _vector(view, box)
            if v is not None:
                rows.append(v)
                windows.append((i, (x, y, w, h)))
    vectors = np.stack(rows) if rows else np.zeros((0, SIDE * SIDE), np.float32)
    return Query(views, vectors, windows)


class CopyIndex:
    """The descriptors of a pile in a faiss inner-product index; ``matches(query)`` -> pile rows.

    The search is exact below ``search.RANGE_EXACT_MAX`` descriptors and IVF-flat above
    (data/search.py ``choose_range_kind``); ``kind`` forces one."""

    def __init__(self, vectors: np.ndarray | None, kind: str = "auto", search=None):
        from .search import VectorSearch

        if search is None:  # ``search``: a VectorSearch built (or loaded) already
            from .search import choose_range_kind

            x = np.asarray(vectors, np.float32).reshape(-1, SIDE * SIDE)
            search = VectorSearch(x, kind=choose_range_kind(len(x)) if kind == "auto" else kind)
        self.search = search
        self.index = self.search.index

    def __len__(self) -> int:
        return len(self.search)

    def candidates(self, query: Query, threshold: float = THRESHOLD) -> dict[int, tuple[float, int]]:
        """Pile rows whose descriptor is within ``threshold`` of a query window: row -> (similarity,
        the query row that came closest)."""
        if not len(self) or not len(query.vectors):
            return {}
        qrow, sims, ids = self.search.range(query.vectors, threshold)
        out: dict[int, tuple[float, int]] = {}
        for s, i, q in zip(sims.tolist(), ids.tolist(), qrow.tolist()):
            if i not in out or s > out[i][0]:
                out[i] = (s, q)
        return out


VERIFY = 0.50  # high-pass correlation that confirms a candidate (see bench/nearcopy.py)
FLAT_THRESHOLD = 0.98  # refined descriptor cosine that confirms a candidate when neither side has detail


def find_copies(query: Query, index: CopyIndex, load, threshold: float = THRESHOLD,
                verify: float = VERIFY, candidates: dict | None = None) -> list[tuple[int, float, float]]:
    """Pile rows that are copies of ``query``: (row, descriptor similarity, verified score), best
    first. ``load(row)`` returns the pile image of a candidate (a PIL image, or None when it cannot be
    read any more: then it is not a match). ``candidates``: ``index.candidates(query, threshold)``
    when the caller has them already (the search is not run twice)."""
    found = []
    if candidates is None:
        candidates = index.candidates(query, threshold)
    for row, (sim, qrow) in candidates.items():
        img = load(row)
        score, flat = query.verify(qrow, img) if img is not None else (-1.0, False)
        if score >= (FLAT_THRESHOLD if flat else verify):
            found.append((row, sim, score))
    return sorted(found, key=lambda t: -t[2])


# ---------------------------------------------------------------- piles (what `takedown add|check --near` runs)


def _pil(item) -> Image.Image:
    """A collection item (uint8 CHW tensor) as a PIL image."""
    arr = np.asarray(item.permute(1, 2, 0).numpy() if hasattr(item, "permute") else item)
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


READ_SIDE = 292  # pile images are decoded (JPEG DCT-scaled) to at least this side


class CopyQueries:
    """A takedown over a described pile: needs ``index`` (CopyIndex), ``keys``, ``paths`` and
    ``images(rows) -> {row: PIL image}``; shared by the scan (``PileIndex``) and the stored index."""

    def copies_of(self, photo: Image.Image, threshold: float = THRESHOLD,
                  verify: float = VERIFY) -> list[tuple[str, str, float, float]]:
        """(key, path, descriptor similarity, verified correlation) of every copy of ``photo``."""
        query = describe_query(photo)
        cands = self.index.candidates(query, threshold)
        imgs = self.images(set(cands))
        found = find_copies(query, self.index, imgs.get, threshold, verify, candidates=cands)
        return [(self.keys[r], self.paths[r], s, f) for r, s, f in found]


class PileIndex(CopyQueries):
    """Descriptors of every image of a pile (a folder, a file list or shards: ``openseer embed``'s
    collections), searchable for copies. Flat (near-blank) and undecodable images are counted."""

    def __init__(self, spec: str, progress: bool = True, flips: bool = False):
        from ..progress import progress as bar
        from .collection import open_collection
        from .takedown import DenyList

        self.spec = spec
        self.coll = open_collection(spec)
        # every image is searched, also those already deny-listed (check --near reports which are)
        self.coll.deny = DenyList()
        self.keys: list[str] = []
        self.paths: list[str] = []
        self.rows: list[int] = []  # collection row of each descriptor
        self.skipped: dict[str, int] = {}
        vecs, flipped = [], []
        with bar("near-copy scan", total=self.coll.n, unit="img", enabled=progress) as p:
            for chunk in self.coll.chunks:
                for row, key, path, item in self.coll.read_chunk(chunk, READ_SIDE):
                    p.update(1)
                    if isinstance(item, str):
                        r = item.split(":")[0]
                        self.skipped[r] = self.skipped.get(r, 0) + 1
                        continue
                    img = _pil(item)
                    v = describe(img)
                    if v is None:
                        self.skipped["flat"] = self.skipped.get("flat", 0) + 1
                        continue
                    vecs.append(v)
                    if flips:  # a borderline-flat image can be flat one way round: then mirror the vector
                        fv = describe(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
                        flipped.append(fv if fv is not None else v.reshape(SIDE, SIDE)[:, ::-1].ravel().copy())
                    self.keys.append(key)
                    self.paths.append(path)
                    self.rows.append(row)
        empty = np.zeros((0, SIDE * SIDE), np.float32)
        self.vectors = np.stack(vecs) if vecs else empty
        self.flipped = np.stack(flipped) if flipped else empty  # mirror images' descriptors (``flips``)
        self.index = CopyIndex(self.vectors)

    def images(self, wanted: set[int]) -> dict[int, Image.Image]:
        """Decode again the pile images of descriptor rows ``wanted`` (only the chunks holding them)."""
        by_row = {self.rows[i]: i for i in wanted}
        out: dict[int, Image.Image] = {}
        for chunk in self.coll.chunks:
            if not any(chunk.start <= r < chunk.stop for r in by_row):
                continue
            for row, _key, _path, item in self.coll.read_chunk(chunk, READ_SIDE):
                if row in by_row and not isinstance(item, str):
                    out[by_row[row]] = _pil(item)
        return out
