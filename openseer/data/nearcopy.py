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
DESCRIPTOR_VERSION = "grey-box16-f32.v1+read292+prep256+win10+fine32h"


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


def describe_pile_image(img: Image.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """What the index stores of a pile image: its descriptor, its mirror image's (the mirrored
    vector where the mirror image is flat), the descriptors of ``WINDOWS`` (zeros where flat) and
    its verification descriptor (``target``: a takedown verifies a candidate without decoding it),
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
    return v, fv, wins, _fine16(prep)


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


def _box_ranges(in0: np.ndarray, in1: np.ndarray, out: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The input pixels [lo, hi) each of ``out`` outputs averages when PIL box-resamples the span
    [in0, in1) of a ``size``-pixel axis (Pillow's ``precompute_coeffs`` with its box filter: the span
    as float32, weights of 0 or 1 on a run of pixels, normalised), per span: (m, out) each."""
    in0 = np.asarray(in0, np.float32)
    scale = (np.asarray(in1, np.float32) - in0).astype(np.float64) / out
    fs = np.maximum(scale, 1.0)
    support = 0.5 * fs
    center = in0.astype(np.float64)[:, None] + (np.arange(out) + 0.5)[None, :] * scale[:, None]
    xmin = np.maximum(0, np.trunc(center - support[:, None] + 0.5).astype(np.int64))
    xmax = np.minimum(size, np.trunc(center + support[:, None] + 0.5).astype(np.int64))
    k = int(np.ceil(support.max())) * 2 + 1
    x = xmin[..., None] + np.arange(k)
    arg = (x - center[..., None] + 0.5) * (1.0 / fs)[:, None, None]
    w = (x < xmax[..., None]) & (arg > -0.5) & (arg <= 0.5)
    lo = xmin + np.argmax(w, axis=-1)
    return lo, lo + w.sum(axis=-1)


def box_resample(img: np.ndarray, table: np.ndarray, boxes: np.ndarray, out: int) -> np.ndarray:
    """``resize((out, out), BOX, box=b)`` of a grey image (``img``, float32 H x W) for many pixel boxes
    ``b`` (m x 4) at once: each output is the mean of the run of pixels Pillow's box filter gives it
    (equal to Pillow's up to its float32 rounding). Small images by two products with the 0/1 run
    matrices; large ones from their summed-area ``table`` ((H+1) x (W+1), float64)."""
    H, W = img.shape
    x0, x1 = _box_ranges(boxes[:, 0], boxes[:, 2], out, W)
    y0, y1 = _box_ranges(boxes[:, 1], boxes[:, 3], out, H)
    if H * W <= 65536:
        cols, rows = np.arange(W), np.arange(H)
        rx = ((cols >= x0[..., None]) & (cols < x1[..., None])) / np.maximum(x1 - x0, 1)[..., None]
        ry = ((rows >= y0[..., None]) & (rows < y1[..., None])) / np.maximum(y1 - y0, 1)[..., None]
        return (ry.astype(np.float32) @ img @ rx.astype(np.float32).transpose(0, 2, 1)).astype(np.float32)
    ya, yb, xa, xb = y0[:, :, None], y1[:, :, None], x0[:, None, :], x1[:, None, :]
    total = table[yb, xb] - table[ya, xb] - table[yb, xa] + table[ya, xa]
    return (total / np.maximum((yb - ya) * (xb - xa), 1)).astype(np.float32)


def summed_area(img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """A grey float image as an array (float32) and its summed-area table ((H+1) x (W+1), float64)."""
    x = np.asarray(img, np.float32)
    t = np.zeros((x.shape[0] + 1, x.shape[1] + 1))
    t[1:, 1:] = x.astype(np.float64).cumsum(0).cumsum(1)
    return x, t


def fine_many(arrays: tuple[np.ndarray, np.ndarray], boxes: list[tuple[float, float, float, float]]
              ) -> list[np.ndarray | None]:
    """``fine`` of many pixel boxes of one image (given as its ``summed_area``): resampled by
    ``box_resample``, the high-pass and the norms in one batch (the verification's inner loop
    describes thousands of boxes a query)."""
    if not boxes:
        return []
    x = box_resample(*arrays, np.asarray(boxes, np.float64), FINE)
    x = (x - _B @ x @ _B.T).reshape(len(boxes), -1)
    x -= x.mean(axis=1, keepdims=True)
    ok = x.std(axis=1) >= FINE_MIN
    x[ok] /= np.linalg.norm(x[ok], axis=1, keepdims=True)
    return [row if good else None for row, good in zip(x, ok.tolist())]


def _fine16(prep: Image.Image) -> np.ndarray:
    """A prepared image's verification descriptor as the index stores it (float16), zeros where it
    has no detail."""
    f = fine(prep)
    return np.zeros(FINE * FINE, np.float16) if f is None else f.astype(np.float16)


def target(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """What a candidate is verified by: its verification descriptor (float16 values, as stored in the
    index; zeros without detail) and its 16 x 16 descriptor (None when flat). From a decoded pile
    image, equal to what the index stored of it."""
    prep = prepare_image(img)
    return _fine16(prep).astype(np.float32), _vector(prep)


@dataclass
class Query:
    """A photo to take down: its grey views (as is, mirrored) and one descriptor per grid window."""

    views: tuple[Image.Image, Image.Image]
    vectors: np.ndarray  # (M, SIDE*SIDE)
    windows: list[tuple[int, tuple[float, float, float, float]]]  # per row: (view, window)
    # the descriptors of view boxes the local search visited, kept across candidates (the same box of
    # the same view is described once per query, however many candidates visit it)
    cache: dict = field(default_factory=dict, repr=False)

    def verify_many(self, rows: np.ndarray, fines: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores, flat) of candidates against query windows ``rows``, given each candidate's
        ``target``: ``fines`` (n, FINE*FINE; zeros without detail) and ``vectors`` (n, SIDE*SIDE; zeros
        when flat). The score is the best high-pass correlation of candidate and window, refined by a
        local search over the window's position and size (the grid is CROP_STEP apart; a real crop
        falls between): coordinate steps of CROP_STEP / 2, halved twice. When neither has detail to
        compare (smooth gradients, near-flat pictures), ``flat`` is True and the score is the 16 x 16
        descriptor's cosine, refined the same way; a candidate without detail against a window with
        detail scores -1. All candidates are searched together: each box a candidate visits is
        described once per query, and scored against every candidate there in one product."""
        rows = np.asarray(rows, np.int64)
        fines = np.asarray(fines, np.float32)
        vectors = np.asarray(vectors, np.float32)
        n = len(rows)
        scores = np.full(n, -1.0)
        flat = ~fines.any(axis=1)
        views = np.array([self.windows[r][0] for r in rows], np.int64)
        boxes = np.array([self.windows[r][1] for r in rows], np.float64).reshape(n, 4)
        detail = np.flatnonzero(~flat)
        if len(detail):
            scores[detail] = self._search(fine, views[detail], boxes[detail], fines[detail])
        # no detail in the candidate: only a detail-free window with a descriptor can be its original
        smooth = np.array([i for i in np.flatnonzero(flat) if vectors[i].any()
                           and self._describe(fine, views[i], boxes[i:i + 1])[1][0] < 0], np.int64)
        if len(smooth):
            scores[smooth] = self._search(_vector, views[smooth], boxes[smooth], vectors[smooth])
        return scores, flat

    def _describe(self, describe, view_i: int, boxes: np.ndarray) -> tuple[list, np.ndarray]:
        """``describe`` of the view ``view_i`` at window ``boxes`` (n, 4: left, top, width, height in
        fractions), cached per query: (descriptor or None per box, inverse indices (-1: off the image))."""
        view = self.views[view_i]
        W, H = view.size
        x0 = np.maximum(0.0, boxes[:, 0])
        y0 = np.maximum(0.0, boxes[:, 1])
        x1 = np.minimum(1.0, boxes[:, 0] + boxes[:, 2])
        y1 = np.minimum(1.0, boxes[:, 1] + boxes[:, 3])
        ok = (x1 - x0 >= 0.05) & (y1 - y0 >= 0.05)
        px = np.stack([x0 * W, y0 * H, x1 * W, y1 * H], axis=1)
        inv = np.full(len(boxes), -1, np.int64)
        vecs: list = []
        if ok.any():
            uniq, where = np.unique(px[ok], axis=0, return_inverse=True)
            keys = [(view_i, describe is fine, box) for box in map(tuple, uniq.tolist())]
            new = [k for k in keys if k not in self.cache]
            if describe is fine:
                if ("table", view_i) not in self.cache:
                    self.cache[("table", view_i)] = summed_area(view)
                self.cache.update(zip(new, fine_many(self.cache[("table", view_i)], [k[2] for k in new])))
            else:
                self.cache.update((k, describe(view, k[2])) for k in new)
            vecs = [self.cache[k] for k in keys]
            inv[ok] = where.reshape(-1)
            inv[ok] = np.where(np.array([v is None for v in vecs])[inv[ok]], -1, inv[ok])
        return vecs, inv

    def _scores(self, describe, views: np.ndarray, boxes: np.ndarray, refs: np.ndarray) -> np.ndarray:
        """Correlation of each candidate's ``refs`` row with its view's ``describe`` at its box (-1
        where the box is off the image or the window is flat)."""
        out = np.full(len(boxes), -1.0)
        for view_i in np.unique(views).tolist():
            sel = np.flatnonzero(views == view_i)
            vecs, inv = self._describe(describe, view_i, boxes[sel])
            good = inv >= 0
            if good.any():
                mat = np.stack([np.zeros_like(refs[0]) if v is None else v for v in vecs])
                out[sel[good]] = np.einsum("ij,ij->i", mat[inv[good]], refs[sel[good]])
        return out

    def _search(self, describe, views: np.ndarray, boxes: np.ndarray, refs: np.ndarray) -> np.ndarray:
        """The best score of each candidate by coordinate steps of CROP_STEP / 2 around its box,
        halved twice: one candidate's coordinate search, run for all candidates in step (a candidate
        moves to the first neighbour that scores higher, as it would on its own)."""
        boxes = boxes.copy()
        best = self._scores(describe, views, boxes, refs)
        step = CROP_STEP / 2
        for _ in range(3):
            active = np.ones(len(boxes), bool)
            while active.any():  # a candidate goes on while its last pass moved it
                moved = np.zeros(len(boxes), bool)
                for k in range(4):
                    for sign in (-1, 1):
                        idx = np.flatnonzero(active)
                        b = boxes[idx].copy()
                        b[:, k] += sign * step
                        c = self._scores(describe, views[idx], b, refs[idx])
                        up = c > best[idx]
                        best[idx[up]], boxes[idx[up]], moved[idx[up]] = c[up], b[up], True
                active = moved
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
    if candidates is None:
        candidates = index.candidates(query, threshold)
    rows, fines, vecs = [], [], []
    for row in candidates:
        img = load(row)
        if img is not None:
            f, v = target(img)
            rows.append(row)
            fines.append(f)
            vecs.append(np.zeros(SIDE * SIDE, np.float32) if v is None else v)
    return confirm(query, candidates, rows, np.stack(fines) if rows else None, np.stack(vecs) if rows else None, verify)


def confirm(query: Query, candidates: dict, rows: list[int], fines: np.ndarray | None, vectors: np.ndarray | None,
            verify: float = VERIFY) -> list[tuple[int, float, float]]:
    """The candidates ``rows`` (with their ``target``s) that verify: (row, similarity, score), best first."""
    if not rows:
        return []
    scores, flat = query.verify_many(np.array([candidates[r][1] for r in rows]), fines, vectors)
    need = np.where(flat, FLAT_THRESHOLD, verify)
    found = [(r, candidates[r][0], float(s)) for r, s, t in zip(rows, scores.tolist(), need.tolist()) if s >= t]
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
        return [(self.keys[r], self.paths[r], s, f) for r, s, f in self._verify(query, cands, verify)]

    def _verify(self, query: Query, cands: dict, verify: float = VERIFY) -> list[tuple[int, float, float]]:
        """The candidates that verify: decoded again (the scan); the stored index reads its targets."""
        imgs = self.images(set(cands))
        return find_copies(query, self.index, imgs.get, verify=verify, candidates=cands)


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
