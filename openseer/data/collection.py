"""Collections: a pile of images in a fixed order, split into chunks, read row by row.

What ``openseer embed``, ``curate``, near-copy takedowns and int8 calibration walk through: a folder
(recursive) or a text file list of image paths (listed and read by ``reader.py``: bounded reads, the
deny-list applied), tar shards (one chunk per shard, read in order) or Fashion-MNIST's train split
in memory. ``read(chunk)`` yields ``(row, key, path, image or reason)``: a bad image is a reason
string (``corrupt``, ``denied``, ``shard_error: ...``), never an exception, so a job counts it and
goes on.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..fileio import name_to_text
from .decode import BadImage, DataError, decode_bytes
from .reader import Collection as FileListing
from .reader import open_collection as list_collection


class CollectionError(DataError):
    """A collection that cannot be opened as asked (what and how to fix it)."""


@dataclass
class Chunk:
    """Rows [start, stop) of the output; ``shard`` set for tar shards (one chunk per shard)."""

    index: int
    start: int
    stop: int
    shard: str = ""


class Collection:
    """Images in a fixed order, split into chunks; ``read(chunk)`` yields (row, key, path, image|reason)."""

    kind = ""

    def __init__(self) -> None:
        self.n = 0
        self.chunks: list[Chunk] = []
        self.description = ""

    def fingerprint(self) -> str:
        raise NotImplementedError

    def read(self, chunk: Chunk, draft: int = 0, workers: int = 0) -> Iterator[tuple[int, str, str, object]]:
        """(row, key, path, uint8 CHW tensor or the reason it is bad) of each row of ``chunk``; JPEGs
        are decoded (DCT-scaled) to no less than ``draft`` pixels a side (0: full size)."""
        raise NotImplementedError


def _split(n: int, chunk_size: int) -> list[Chunk]:
    return [Chunk(i, s, min(n, s + chunk_size)) for i, s in enumerate(range(0, n, chunk_size))]


def _reason(e: BadImage, name: str) -> str:
    """'reason' or 'reason: detail' without the file name the detail repeats."""
    detail = e.detail[len(name):].lstrip(": ") if e.detail.startswith(name) else e.detail
    return f"{e.reason}: {detail}" if detail else e.reason


def _tensor(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


class _FileDataset(torch.utils.data.Dataset):
    def __init__(self, listing: FileListing, rows: range, draft: int):
        self.listing, self.rows, self.draft = listing, rows, draft

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        try:
            return row, _tensor(self.listing.load(row, draft_size=self.draft))
        except BadImage as e:
            return row, _reason(e, os.fsdecode(self.listing.entries[row].path))


class FileCollection(Collection):
    """A folder (recursive) or a text file list of image paths, listed and read by data/reader.py
    (bounded reads, the deny-list in the folder applied); keys and paths are name text."""

    kind = "files"

    def __init__(self, spec: str, chunk_size: int, limit: int = 0):
        super().__init__()
        self.listing = list_collection(spec, shards=False)
        if limit:
            self.listing.entries = self.listing.entries[:limit]
        self.keys = [e.key for e in self.listing.entries]
        self.paths = [e.path for e in self.listing.entries]
        self.n = len(self.keys)
        self.chunks = _split(self.n, chunk_size)
        self.description = f"{'folder' if Path(spec).is_dir() else 'file list'} {spec} ({self.n} images)"

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for k in self.keys:
            h.update(k.encode("utf-8", "backslashreplace") + b"\n")
        return h.hexdigest()[:16]

    def read(self, chunk: Chunk, draft: int = 0, workers: int = 0):
        ds = _FileDataset(self.listing, range(chunk.start, chunk.stop), draft)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, shuffle=False,
                                             prefetch_factor=16 if workers else None)
        for row, item in loader:
            row = int(row)
            yield row, self.keys[row], name_to_text(self.paths[row]), item


class TensorCollection(Collection):
    """Fashion-MNIST (the train split, in memory)."""

    kind = "fashion-mnist"

    def __init__(self, spec: str, chunk_size: int, limit: int = 0):
        super().__init__()
        from .sources import open_source

        src = open_source(spec, limit=limit)
        self.images = src.images  # type: ignore[attr-defined]
        self.name = "fashion-mnist"
        self.n = len(self.images)
        self.chunks = _split(self.n, chunk_size)
        self.description = src.description

    def fingerprint(self) -> str:
        return hashlib.sha256(self.images.contiguous().numpy().tobytes()).hexdigest()[:16]

    def read(self, chunk: Chunk, draft: int = 0, workers: int = 0):
        for row in range(chunk.start, chunk.stop):
            yield row, f"{self.name}:train:{row}", "", self.images[row]


class ShardCollection(Collection):
    """Tar shards, read in order; one chunk per shard (its sample count from index.json or the tar)."""

    kind = "shards"

    def __init__(self, spec: str, limit: int = 0):
        super().__init__()
        from .sources import ShardSource
        from .stream import count_samples

        src = ShardSource(spec)
        self.urls, self.deny = src.urls, src.deny
        start = 0
        for i, url in enumerate(self.urls):
            name = Path(url).name
            n = src.index.get(name) if name in src.index else count_samples(url)
            if limit:
                n = min(n, limit - start)
            if n <= 0:
                break
            self.chunks.append(Chunk(i, start, start + n, url))
            start += n
        self.n = start
        self.description = f"tar shards {spec} ({len(self.chunks)} shards, {self.n} samples)"

    def fingerprint(self) -> str:
        from .stream import urls_digest

        return f"{urls_digest(self.urls)}:{self.n}:{self.deny.version if self.deny.path else ''}"

    def read(self, chunk: Chunk, draft: int = 0, workers: int = 0):
        from .stream import iter_shard

        errors: list[str] = []
        row = chunk.start
        name = Path(chunk.shard).name
        for s in iter_shard(chunk.shard, chunk.index, errors):
            if row >= chunk.stop:
                break
            where = f"{chunk.shard}#{s.key}"
            if s.reason:
                yield row, s.key, where, s.reason
            elif self.deny.denies(s.key, s.data):
                yield row, s.key, where, "denied"
            else:
                try:
                    yield row, s.key, where, _tensor(decode_bytes(s.data or b"", f"{name}:{s.key}",
                                                                  draft_size=draft))
                except BadImage as e:
                    yield row, s.key, where, _reason(e, f"{name}:{s.key}")
            row += 1
        for r in range(row, chunk.stop):  # the shard ended early (damaged): the rest is missing
            detail = f": {errors[0]}" if errors else ""
            yield r, f"{name}:#{r - chunk.start}", chunk.shard, f"shard_error{detail}"


def open_collection(spec: str, chunk_size: int = 4096, limit: int = 0) -> Collection:
    from .sources import is_fashion_mnist
    from .stream import looks_like_shards

    if not spec:
        raise CollectionError("no data given: pass --data (a folder, a .txt list of paths, tar shards or fashion-mnist)")
    path = Path(spec).expanduser()
    if is_fashion_mnist(spec):
        return TensorCollection(spec, chunk_size, limit)
    if looks_like_shards(spec):
        return ShardCollection(spec, limit)
    if not path.exists():
        raise CollectionError(f"{spec} does not exist (give a folder of images, a .txt list of paths, tar shards "
                         f"or fashion-mnist)")
    return FileCollection(spec, chunk_size, limit)
