"""A takedown's quick way into the pile index: the checked index of one listing, consolidated on disk.

``open_index``'s full check (data/index.py ``StoredIndex``) lists the pile, looks at every file and
reads every part's row table: Python work per image on every ``takedown --near`` (most of a second
at 10,000 images, minutes at a million). Once a full check has passed, ``write`` keeps its result
in ``INDEX/snapshots/<digest of the pile spec>/``::

    meta.json     the spec, what the check saw (the manifest's size and time, the descriptor version,
                  the modification time of every folder of the pile, the size and time of a list file
                  or of each shard), row count, skipped images by reason, the part ids
    vectors.npy   the rows' descriptors in pile order (float32), memory-mapped when read (only with
                  exact search: an approximate one holds them, and the parts have them for curate)
    rows.npy      per row: tar offset, length, position, pixels, file bytes, part, row in the part
    strings.bin / strings.npy   per row: key, path, content key, file to read (utf-8, with offsets)
    search.faiss  the range search's index when it is approximate (search.py ``choose_range_kind``)

``open_quick`` answers from it without listing the pile when nothing it recorded changed: a file
added to, removed from or renamed within a folder changes that folder's modification time; a list
file or a shard that changed has another size or time; ``openseer index`` rewrites the manifest.
Any change sends ``open_index`` back to the full check (which names what no longer matches, and
writes a new snapshot when it passes). A file rewritten in place under the same name leaves its
folder's time alone: it is caught when it is a candidate (its content key is compared when it is
read for verification: data/index.py ``StoredIndex._read``), and by the next ``openseer index``.
The per-row strings, the mirror images' and the windows' descriptors are read only when asked
for (``curate`` asks; a takedown reads only its candidates' rows).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..fileio import atomic_write_json
from . import index as _index
from .index import INDEX_DIR, StoredIndex, _arrays
from .nearcopy import SIDE, WINDOWS, CopyIndex

FORMAT = "openseer.index-snapshot.v1"
FOLDER = "snapshots"
STRINGS = 4  # key, path, content key, file to read
RACY_NS = 50_000_000  # 50 ms: far coarser than any file system's clock tick for modification times


def _key(spec: str) -> str:
    return hashlib.sha256(os.path.abspath(spec).encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _mtime(path: str) -> int:
    try:
        return int(os.stat(path).st_mtime_ns)
    except OSError:
        return -1


def _ident(path: str) -> list[int]:
    try:
        st = os.stat(path)
    except OSError:
        return [-1, -1]
    return [int(st.st_size), int(st.st_mtime_ns)]


def _watched(stored, since: int) -> tuple[dict[str, int], dict[str, list[int]]]:
    """(folder -> modification time, file -> [size, time]) whose change can change the pile's listing;
    one changed within ``RACY_NS`` of ``since`` (when the full check began) is recorded as never
    matching: it may have changed while the check ran, or may change again within the same clock
    tick and keep its time (git's racily clean files), so the next open checks in full."""
    from .collection import ShardCollection

    coll, index_dir = stored.coll, os.path.abspath(stored.folder)
    dirs: set[str] = set()
    files: list[str] = []
    if isinstance(coll, ShardCollection):
        files = [os.path.abspath(u) for u in coll.urls]
        dirs = {os.path.dirname(f) for f in files}
    elif getattr(coll, "list_file", None) is not None:
        files = [os.path.abspath(coll.list_file)]
        dirs = {os.path.dirname(os.path.abspath(e.path)) for e in coll.entries}
    else:  # a folder: every folder under it (a new sub-folder changes its parent's time)
        for top, subdirs, _ in os.walk(coll.base):
            top = os.path.abspath(top)
            subdirs[:] = [d for d in subdirs if os.path.join(top, d) != index_dir]
            dirs.add(top)
    racy = since - RACY_NS
    stamp = {d: _mtime(d) for d in sorted(dirs)}
    return ({d: (-2 if t > racy else t) for d, t in stamp.items()},
            {f: (lambda v: [-2, -2] if v[1] > racy else v)(_ident(f)) for f in files})


def write(stored, spec: str, since: int) -> None:
    """Keep the checked index ``stored`` (a ``StoredIndex`` checked against ``spec`` from ``since``,
    ``time.time_ns()``) as a snapshot; a failure to write (a read-only pile) only costs the next call
    a full check."""
    from .search import VectorSearch, choose_range_kind

    folder = Path(stored.folder)
    dirs, files = _watched(stored, since)
    manifest = _ident(str(folder / "index.json"))
    if manifest[1] > since - RACY_NS:
        manifest = [-2, -2]
    final = folder / FOLDER / _key(spec)
    tmp = folder / FOLDER / f".{_key(spec)}.{os.getpid()}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        n = len(stored.keys)
        kind = choose_range_kind(n)
        if kind == "flat":  # else the vectors are in the search index (and in the parts, for curate)
            np.save(tmp / "vectors.npy", np.ascontiguousarray(stored.vectors, np.float32))
        parts = sorted(set(stored.part_rows[0])) if n else []
        pnum = {p: i for i, p in enumerate(parts)}
        rows = np.zeros((n, 7), np.int64)
        for r, (_file, off, length, pos) in enumerate(stored.loc):
            rows[r, :3] = off, length, pos
        rows[:, 3], rows[:, 4] = stored.pixels, stored.nbytes
        rows[:, 5] = [pnum[p] for p in stored.part_rows[0]]
        rows[:, 6] = stored.part_rows[1]
        np.save(tmp / "rows.npy", rows)
        blobs, offs, at = [], [0], 0
        for r in range(n):
            for s in (stored.keys[r], stored.paths[r], stored.content_keys[r], os.fspath(stored.loc[r][0])):
                b = s.encode("utf-8", "surrogateescape")
                blobs.append(b)
                at += len(b)
                offs.append(at)
        (tmp / "strings.bin").write_bytes(b"".join(blobs))
        np.save(tmp / "strings.npy", np.asarray(offs, np.int64))
        if kind != "flat":
            VectorSearch(np.asarray(stored.vectors, np.float32), kind=kind).save(tmp / "search.faiss")
        atomic_write_json(tmp / "meta.json", {
            "format": FORMAT, "spec": os.path.abspath(spec), "descriptor": _index.DESCRIPTOR_VERSION,
            "manifest": manifest, "dirs": dirs, "files": files, "rows": n,
            "skipped": stored.skipped, "parts": parts, "search": kind})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def open_quick(spec: str, index: str | os.PathLike = ""):
    """The snapshot of ``spec``'s index as a ``QuickIndex`` when one is kept and nothing it watched
    changed, else None (the caller runs the full check)."""
    if index:
        candidates = [Path(index).expanduser()]
    else:
        p = Path(spec).expanduser()
        candidates = [p / INDEX_DIR, p.parent / INDEX_DIR]
    for folder in candidates:
        snap = folder / FOLDER / _key(spec)
        try:
            meta = json.loads((snap / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (meta.get("format") != FORMAT or meta.get("spec") != os.path.abspath(spec)
                or meta.get("descriptor") != _index.DESCRIPTOR_VERSION  # the reader's, now
                or meta.get("manifest") != _ident(str(folder / "index.json"))
                or any(_mtime(d) != t for d, t in meta["dirs"].items())
                or any(_ident(f) != v for f, v in meta["files"].items())):
            return None
        try:
            return QuickIndex(spec, folder, snap, meta)
        except (OSError, ValueError):
            return None
    return None


class _Strings(Sequence):
    """One of a snapshot's per-row strings (key, path, ...), decoded when read."""

    def __init__(self, blob: np.ndarray, offs: np.ndarray, which: int, n: int):
        self.blob, self.offs, self.which, self.n = blob, offs, which, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, r):
        if isinstance(r, slice):
            return [self[i] for i in range(*r.indices(self.n))]
        if r < 0:
            r += self.n
        if not 0 <= r < self.n:
            raise IndexError(r)
        j = STRINGS * r + self.which
        return bytes(self.blob[int(self.offs[j]):int(self.offs[j + 1])]).decode("utf-8", "surrogateescape")

    def __iter__(self):
        blob = bytes(self.blob)
        offs = self.offs.tolist()
        for r in range(self.n):
            j = STRINGS * r + self.which
            yield blob[offs[j]:offs[j + 1]].decode("utf-8", "surrogateescape")

    def __eq__(self, other) -> bool:
        return list(self) == list(other)


class _Loc(Sequence):
    """(file, tar offset, length, position) of each row, as ``StoredIndex.loc`` holds them."""

    def __init__(self, files: _Strings, rows: np.ndarray):
        self.files, self.rows = files, rows

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, r):
        off, length, pos = (int(v) for v in self.rows[r, :3])
        return self.files[r], off, length, pos


class QuickIndex(StoredIndex):
    """A ``StoredIndex`` read from its snapshot: the same members, read lazily (see the module docstring)."""

    def __init__(self, spec: str, folder: Path, snap: Path, meta: dict):
        from .search import VectorSearch

        self.coll, self.folder, self.spec, self.snapshot = None, folder, spec, snap
        n = int(meta["rows"])
        self.skipped = dict(meta["skipped"])
        self.parts = list(meta["parts"])
        self._rows = np.load(snap / "rows.npy", mmap_mode="r")
        self._vectors = np.load(snap / "vectors.npy", mmap_mode="r") if meta["search"] == "flat" else None
        blob = np.memmap(snap / "strings.bin", np.uint8, mode="r") if n else np.zeros(0, np.uint8)
        offs = np.load(snap / "strings.npy", mmap_mode="r")
        if len(self._rows) != n or len(offs) != STRINGS * n + 1:
            raise ValueError(f"{snap}: damaged snapshot")
        self.keys, self.paths, self.content_keys = (_Strings(blob, offs, i, n) for i in range(3))
        self.loc = _Loc(_Strings(blob, offs, 3, n), self._rows)
        self.pixels = np.asarray(self._rows[:, 3])
        self.nbytes = np.asarray(self._rows[:, 4])
        if meta["search"] == "flat":
            self.index = CopyIndex(np.asarray(self.vectors))
        else:
            self.index = CopyIndex(None, search=VectorSearch.load(snap / "search.faiss", meta["search"]))
        self._flipped = self._windows = None

    def _gather(self, which: int, shape: tuple, dtype) -> np.ndarray:
        out = np.zeros((len(self.keys), *shape), dtype)
        part, vrow = np.asarray(self._rows[:, 5]), np.asarray(self._rows[:, 6])
        for i, pid in enumerate(self.parts):
            dst = np.flatnonzero(part == i)
            if len(dst):
                out[dst] = _arrays(self.folder, pid)[which][vrow[dst]]
        return out

    @property
    def vectors(self) -> np.ndarray:  # type: ignore[override]
        if self._vectors is None:  # an approximate search holds them: read from the parts when asked
            self._vectors = self._gather(0, (SIDE * SIDE,), np.float32)
        return self._vectors

    @property
    def flipped(self) -> np.ndarray:  # type: ignore[override]
        if self._flipped is None:
            self._flipped = self._gather(1, (SIDE * SIDE,), np.float32)
        return self._flipped

    @property
    def windows(self) -> np.ndarray:  # type: ignore[override]
        if self._windows is None:
            self._windows = self._gather(2, (len(WINDOWS), SIDE * SIDE), np.float16)
        return self._windows
