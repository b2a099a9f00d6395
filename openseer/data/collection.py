"""The pile type: a ``Collection`` of images, however it is stored, read one way by every command.

``open_collection(spec)`` opens what ``--data`` names: a folder (searched recursively), a file list
(one path per line, e.g. ``openseer curate``'s ``list.txt``), tar shards (a ``.tar`` path, a brace
range or glob, ``pipe:CMD``, a folder written by ``openseer shard``, several joined by ``::``), or
Fashion-MNIST (``fashion-mnist`` or a folder holding its idx files, kept in memory as one uint8
tensor). Each kind is one class: ``FileCollection``, ``ShardCollection``, ``TensorCollection``.

Three ways to read one, the same skips and the same deny-list in each::

    coll = open_collection("/photos")
    skips = SkipCounts()
    for item in coll.items(skips=skips):     # stream: every entry in order, bad ones with a reason
        if item.reason: continue             #   (see REASONS); item.image is RGB when decoded
    require_usable(coll, skips)              # DataError when nothing usable was found
    image = coll.load(i)                     # random access (files, tensors): BadImage when bad
    for chunk in coll.chunks:                # resumable chunks (one per shard for shards):
        for row, key, path, image_or_reason in coll.read_chunk(chunk): ...

Tar shards are a stream: they have no random access (``load`` refuses), and the training batches
of shards come from data/batches.py's ``StreamBatches``; their ``len`` is the samples of one (virtual) epoch.

Listing. A folder is walked recursively (symlinked folders are not followed, so a symlink loop
cannot recurse), in sorted order; a file is a candidate when its extension is an image extension in
any case (``.JPG``, ``.Jpeg``); its content decides how it is decoded. A folder named ``x.jpg`` is a
folder. A file list is one written by ``fileio.write_list`` (escaped names) or a plain one a person
wrote (one path per line; blank lines and ``#`` comments ignored; relative paths are relative to the
list's folder). Names are kept as the OS gave them (bytes that are not UTF-8 as surrogate escapes):
``Entry.path`` opens the file, ``Entry.key`` is its name as text for record files
(``fileio.name_to_text``; ``fileio.text_to_name`` turns it back).

Bounded time. Reading one file (stat, open, read) runs under ``read_timeout`` seconds
(``data.read_timeout``; ``$OPENSEER_READ_TIMEOUT`` for every command; ``--read-timeout`` where a
command has it); a file that takes longer (a hung network mount) is skipped as ``timeout`` and the
run goes on (``decode.read_bytes``). FIFOs and devices are refused before reading (``not_a_file``).
``pipe:`` shards use ``data.pipe_timeout`` (a command silent that long is stopped; its shard ends as
``shard_error``).

Deny-list. ``denylist`` or, when empty, ``takedowns.txt`` beside the data: a listed file or sample
(by its key, its relative path or the content key of its bytes) is skipped as ``denied``.

Images beyond RGB photos. Every kind decodes through ``decode.decode_bytes`` with the collection's
``decoding`` (``decode.Decoding``: the channels the backbone takes, ``model.in_chans``, and
``data.dicom_window``): with 3 channels an image is 8-bit RGB as always; with 1 it is full-depth
grey (a PIL ``F`` image in [0, 1]; ``read_chunk`` gives a float32 (1, H, W) tensor instead of
uint8 (3, H, W)), so a 16-bit scan or a DICOM frame keeps its depth. DICOM files (``.dcm``,
``.dicom``) are listed with the other images. A multi-frame DICOM file is one row, its middle
frame, by default (``data.dicom_frames=middle``): a row stays a file, so deny-lists, takedowns and
shard counts mean what they mean for photos, and listing a folder reads no DICOM header. With
``data.dicom_frames=all`` every frame is a row of its own, keyed ``name.dcm#i`` (i from 0, as
pydicom indexes frames): a CT or MR volume stored as one enhanced file becomes its slices, which is
what pretraining on scans wants; listing then reads each DICOM header once (bounded by
``read_timeout``). Denying ``name.dcm`` denies all its frames, ``name.dcm#i`` one frame. Commands
without a data config read ``$OPENSEER_DICOM_WINDOW`` and ``$OPENSEER_DICOM_FRAMES``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..fileio import name_to_text, read_list
from .decode import (
    DICOM_EXTENSIONS,
    IMAGE_EXTENSIONS,
    BadImage,
    DataError,
    Decoding,
    call_with_timeout,
    decode_bytes,
    default_read_timeout,
    dicom_frame_count,
    parse_window,
    read_bytes,
)
from .denylist import DenyList, TakedownError
from .stream import (
    DEFAULT_DENYLIST,
    INDEX,
    MANIFEST,
    PIPE_TIMEOUT,
    count_samples,
    expand_spec,
    iter_shard,
    looks_like_shards,
    urls_digest,
)

# every reason a file or sample is skipped, with what it means to a person
REASONS = {
    "empty": "a zero-byte file",
    "truncated": "the data stops early (a cut download or copy)",
    "corrupt": "image data that does not decode",
    "not_an_image": "not image data (text, HTML, random bytes) under an image name",
    "too_many_pixels": "over the pixel limit (a decompression bomb)",
    "too_large": "a file over the size limit (not read)",
    "unreadable": "cannot be opened: permission denied, a dangling symlink, a symlink loop, an I/O error",
    "not_a_file": "a FIFO, socket or device under an image name (reading it could block)",
    "timeout": "reading it took longer than the read timeout (a hung mount); given up",
    "no_decoder": "a compressed DICOM whose transfer syntax has no decoder installed (pylibjpeg, gdcm, pyjpegls)",
    "denied": "on the deny-list",
    "no_image": "a shard sample without an image member",
    "shard_error": "a damaged tar, or a pipe: command that failed or stalled; the rest of that shard is lost",
    "shard_changed": "a sample buffered at a checkpoint that is no longer in its shard",
}

CHUNK_SIZE = 4096  # rows per chunk of a folder, file list or tensor (shards: one chunk per shard)


# ---------------------------------------------------------------- what a read gives


@dataclass(frozen=True)
class Entry:
    """One listed file: ``name`` as listed (relative to the folder, or the list's line), ``path`` to open;
    ``frame`` >= 0 for one frame of a multi-frame DICOM file (``data.dicom_frames=all``)."""

    name: str
    path: Path
    frame: int = -1

    @property
    def key(self) -> str:
        """The name as one line of text (record files, deny-list keys, messages); ``name.dcm#i`` for a frame."""
        return name_to_text(self.name) + self.suffix

    @property
    def suffix(self) -> str:
        return f"#{self.frame}" if self.frame >= 0 else ""

    @property
    def where(self) -> str:
        """The path as text, with ``#i`` for a frame."""
        return name_to_text(self.path) + self.suffix


@dataclass
class Item:
    """One entry or shard sample as read: an RGB image (``decode=True``), the bytes, or why not."""

    key: str  # name text (files) or sample key (shards)
    where: str  # the path, or 'shard.tar#key', as text
    index: int = -1  # position in the listing (files) or in its shard (shards)
    data: bytes | None = None
    image: object = None  # PIL RGB (or F: 1 channel) image when decoded (a uint8 CHW tensor in memory)
    reason: str = ""
    detail: str = ""
    shard: str = ""  # the shard URL (shards)

    @property
    def ok(self) -> bool:
        return not self.reason


@dataclass
class Chunk:
    """Rows [start, stop) of a collection; ``shard`` set for tar shards (one chunk per shard)."""

    index: int
    start: int
    stop: int
    shard: str = ""


class SkipCounts(Counter):
    """Skipped entries counted by reason, with the first few examples of each kept for messages."""

    def __init__(self) -> None:
        super().__init__()
        self.read = 0
        self.examples: dict[str, list[str]] = {}

    def good(self) -> None:
        self.read += 1

    def skip(self, reason: str, where: str = "") -> None:
        self[reason] += 1
        if where and len(self.examples.setdefault(reason, [])) < 3:
            self.examples[reason].append(where)

    @property
    def skipped(self) -> int:
        return sum(self.values())

    def by_reason(self) -> dict[str, int]:
        return dict(sorted(self.items()))

    def summary(self) -> str:
        """'N read, M skipped: reason n, ...' (one line for a person)."""
        if not self.skipped:
            return f"{self.read} read, none skipped"
        parts = ", ".join(f"{r} {n}" for r, n in sorted(self.items()))
        return f"{self.read} read, {self.skipped} skipped: {parts}"


def _reason(e: BadImage, name: str) -> str:
    """'reason' or 'reason: detail' without the file name the detail repeats."""
    detail = e.detail[len(name):].lstrip(": ") if e.detail.startswith(name) else e.detail
    return f"{e.reason}: {detail}" if detail else e.reason


def image_to_tensor(img) -> torch.Tensor:
    """A decoded image as a tensor: RGB as uint8 (3, H, W); full-depth grey (PIL ``F``) as float32 (1, H, W) in [0, 1]."""
    if img.mode == "F":
        return torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).unsqueeze(0)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


_tensor = image_to_tensor


def _split(n: int, chunk_size: int) -> list[Chunk]:
    return [Chunk(i, s, min(n, s + chunk_size)) for i, s in enumerate(range(0, n, chunk_size))]


def describe_denylist(deny: DenyList) -> str:
    """', deny-list PATH (N keys, version V)' for a description ('' without a list)."""
    return f", deny-list {deny.path} ({len(deny)} keys, version {deny.version})" if deny.path else ""


# ---------------------------------------------------------------- the type


class Collection:
    """A pile of images in a fixed order (see the module docstring for the three ways to read one).

    ``kind`` is ``files``, ``shards`` or ``memory``; ``deny`` the deny-list applied; ``description``
    one line for a person. A new kind of pile implements ``__len__``, ``key``, ``load``, ``subset``,
    ``_items`` (the stream), ``read_chunk`` and ``fingerprint`` (and ``chunks`` when a chunk is not
    ``chunk_size`` rows).
    """

    kind = ""
    streaming = False  # tar shards: no random access
    in_memory = False  # a uint8 tensor: batches can be augmented in one go
    chunk_size = CHUNK_SIZE
    description = ""  # one line for a person, set by each kind

    _decoding: Decoding | None = None

    def __init__(self, spec: str, deny: DenyList | None = None):
        self.spec = spec
        self.deny = deny if deny is not None else DenyList()

    @property
    def decoding(self) -> Decoding:
        """The channels and DICOM window every read of this pile uses: set by ``open_collection``;
        a collection made directly (eval's labelled files) reads RGB with ``$OPENSEER_DICOM_WINDOW``."""
        return self._decoding if self._decoding is not None else Decoding(3, default_dicom()[0])

    @decoding.setter
    def decoding(self, value: Decoding) -> None:
        self._decoding = value

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def n(self) -> int:
        """Rows the chunks cover (``len`` too, except for shards, whose ``len`` is a virtual epoch)."""
        return len(self)

    # -- random access (not for shards) --------------------------------------------------------
    def key(self, i: int) -> str:
        """Row ``i``'s key as text (record files, deny-list keys, embeddings)."""
        raise NotImplementedError

    def batch_key(self, i: int) -> str:
        """The key a training batch reports for row ``i`` (bad images, diagnostics)."""
        return self.key(i)

    def load(self, i: int, draft_size: int | None = None, min_pixels: int | None = None):
        """Row ``i`` decoded (PIL RGB; a uint8 CHW tensor when in memory); ``BadImage`` with a reason.

        JPEGs may be DCT-scaled to ``draft_size`` a side or to keep ``min_pixels`` (see decode.py)."""
        raise NotImplementedError

    def __getitem__(self, i: int):
        return self.load(i)

    def subset(self, rows: Sequence[int], note: str = "") -> Collection:
        """The same pile restricted to ``rows`` (in that order); ``note`` is added to the description."""
        raise NotImplementedError

    def head(self, n: int) -> Collection:
        """The first ``n`` rows (``data.limit``)."""
        return self.subset(range(min(n, len(self))), f", first {min(n, len(self))}")

    # -- stream -------------------------------------------------------------------------------
    def items(self, decode: bool = True, draft_size: int | None = None, min_pixels: int | None = None,
              skips: SkipCounts | None = None) -> Iterator[Item]:
        """Every row (or shard sample) in order; bad ones carry a reason and are counted in ``skips``."""
        for it in self._items(decode, draft_size, min_pixels):
            if skips is not None:
                skips.skip(it.reason, it.where) if it.reason else skips.good()
            yield it

    def _items(self, decode: bool, draft_size: int | None, min_pixels: int | None) -> Iterator[Item]:
        raise NotImplementedError

    # -- resumable chunks ---------------------------------------------------------------------
    @property
    def chunks(self) -> list[Chunk]:
        """The rows split into chunks of ``chunk_size`` (shards: one per shard)."""
        return _split(self.n, self.chunk_size)

    def read_chunk(self, chunk: Chunk, draft: int = 0, workers: int = 0) -> Iterator[tuple[int, str, str, object]]:
        """(row, key, path, uint8 CHW tensor or the reason it is bad) of each row of ``chunk``; JPEGs
        are decoded (DCT-scaled) to no less than ``draft`` pixels a side (0: full size). A bad image
        is a reason string (``corrupt``, ``denied``, ``shard_error: ...``), never an exception."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A short hash that changes when the rows do (resumed chunked jobs check it)."""
        raise NotImplementedError

    def provenance(self) -> dict:
        """What this collection reads, for RUN_DIR/data_provenance.json."""
        return {"source": self.spec}


# ---------------------------------------------------------------- folders and file lists


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_folder(root: str | Path) -> list[str]:
    """Image names under ``root`` relative to it (recursive, any extension case), sorted.

    Symlinked folders are not followed (no loops); symlinks to files, dangling symlinks and special
    files with image names are listed, and skipped with a reason when read."""
    root = Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            if is_image_name(name):
                out.append(name if rel == "." else os.path.join(rel, name))
    return sorted(out)


def read_file_list(path: str | Path) -> list[str]:
    """Paths of a file list (``fileio.write_list``'s escaped form, or one path per line)."""
    try:
        return read_list(path)
    except OSError as e:
        raise DataError(f"cannot read file list {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise DataError(str(e)) from None


class _ChunkFiles(torch.utils.data.Dataset):
    """Rows of a file collection decoded in loader workers: (row, uint8 CHW tensor or reason)."""

    def __init__(self, coll: FileCollection, rows: range, draft: int):
        self.coll, self.rows, self.draft = coll, rows, draft

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        try:
            return row, _tensor(self.coll.load(row, draft_size=self.draft))
        except BadImage as e:
            e_ = self.coll.entries[row]
            return row, _reason(e, os.fsdecode(e_.path) + e_.suffix)


class PixelRows:
    """The decode cache of a file collection's rows (data/index.py ``open_pixels``): per row the small
    copy's store file, offset and length (-1: none, the original is read), the original's size,
    modification time and content key when the copy was made.

    ``read(i, path, timeout)`` gives the copy's bytes only while the original is unchanged (one
    ``stat`` per read, in bounded time): a file changed or removed since is read as itself, so a
    stale copy is never used."""

    def __init__(self, side: int, stores: list[str], store: np.ndarray, offset: np.ndarray, length: np.ndarray,
                 size: np.ndarray, mtime_ns: np.ndarray, content_keys: list[str]):
        self.side, self.stores = side, stores
        self.store, self.offset, self.length = store, offset, length
        self.size, self.mtime_ns, self.content_keys = size, mtime_ns, content_keys

    def __len__(self) -> int:
        return len(self.length)

    @property
    def stored(self) -> int:
        """Rows that have a copy."""
        return int((self.length >= 0).sum())

    def subset(self, rows: Sequence[int]) -> PixelRows:
        r = np.asarray([int(i) for i in rows], dtype=np.int64)
        return PixelRows(self.side, self.stores, self.store[r], self.offset[r], self.length[r], self.size[r],
                         self.mtime_ns[r], [self.content_keys[int(i)] for i in r])

    def read(self, i: int, path: Path, timeout: float) -> bytes | None:
        """Row ``i``'s copy, or None (no copy, the original changed or gone, or the store unreadable)."""
        if self.length[i] < 0:
            return None

        def go() -> bytes | None:
            st = os.stat(path)
            if (st.st_size, st.st_mtime_ns) != (int(self.size[i]), int(self.mtime_ns[i])):
                return None
            with open(self.stores[int(self.store[i])], "rb") as f:
                f.seek(int(self.offset[i]))
                data = f.read(int(self.length[i]))
            return data if len(data) == int(self.length[i]) else None

        try:
            return call_with_timeout(go, timeout, os.fsdecode(path))
        except (OSError, BadImage):
            return None


class FileCollection(Collection):
    """A folder (recursive, sorted; subfolders are NOT labels) or a file list, in its order.

    Each file is read in bounded time and checked against the deny-list (by its relative path or
    content key) before it is decoded. With ``pixels`` (the decode cache, ``PixelRows``) a row that
    has a small copy is decoded from it instead (the deny-list applied by its key and the content
    key of the original), the original read only when it has none or changed since."""

    pixels: PixelRows | None = None

    kind = "files"

    def __init__(self, spec: str, what: str, base: Path | None, entries: list[Entry], deny: DenyList,
                 read_timeout: float, pipe_timeout: float = PIPE_TIMEOUT, list_file: Path | None = None):
        super().__init__(spec, deny)
        self.what, self.base, self.entries = what, base, entries  # what: 'folder' or 'file list'
        self.read_timeout, self.pipe_timeout = read_timeout, pipe_timeout
        self.list_file = list_file
        self.listed = len(entries)  # files listed (a subset keeps the count of the whole listing)
        self.description = f"{what} {spec} ({len(entries)} files{describe_denylist(deny)})"

    def __len__(self) -> int:
        return len(self.entries)

    @cached_property
    def paths(self) -> list[Path]:
        """The path of every entry (computed once: the entries of a collection do not change)."""
        return [e.path for e in self.entries]

    def key(self, i: int) -> str:
        return self.entries[i].key

    def batch_key(self, i: int) -> str:
        """The name as the OS gives it (bad_images.txt turns it into text with ``fileio.name_to_text``)."""
        return self.entries[i].name + self.entries[i].suffix

    def read(self, i: int) -> bytes:
        """The bytes of entry ``i`` (bounded time, deny-list applied); ``BadImage`` with a reason."""
        e = self.entries[i]
        data = read_bytes(e.path, self.read_timeout)
        if self.deny.keys and (self.deny.denies(e.key, data) or self.deny.denies(e.name)):
            raise BadImage("denied", e.key)
        return data

    def load(self, i: int, draft_size: int | None = None, min_pixels: int | None = None):
        e = self.entries[i]
        copy = self.pixels.read(i, e.path, self.read_timeout) if self.pixels is not None else None
        if copy is not None:
            if self.deny.keys and (self.deny.denies(e.key) or self.deny.denies(e.name)
                                   or self.deny.denies(self.pixels.content_keys[i])):  # type: ignore[union-attr]
                raise BadImage("denied", e.key)
            try:
                return decode_bytes(copy, f"{os.fsdecode(e.path)}{e.suffix} (decode cache)", draft_size=draft_size,
                                    min_pixels=min_pixels, decoding=self.decoding)
            except BadImage:
                pass  # a damaged copy: the original decides
        return decode_bytes(self.read(i), os.fsdecode(e.path) + e.suffix, draft_size=draft_size,
                            min_pixels=min_pixels, decoding=self.decoding, frame=e.frame if e.frame >= 0 else None)

    def item(self, i: int, decode: bool = True, draft_size: int | None = None,
             min_pixels: int | None = None) -> Item:
        """Entry ``i`` as an ``Item`` (never raises for a bad file)."""
        e = self.entries[i]
        out = Item(e.key, e.where, i)
        try:
            out.data = self.read(i)
            if decode:
                out.image = decode_bytes(out.data, out.where, draft_size=draft_size, min_pixels=min_pixels,
                                         decoding=self.decoding, frame=e.frame if e.frame >= 0 else None)
        except BadImage as err:
            out.reason, out.detail, out.data = err.reason, err.detail, None
        return out

    def _items(self, decode: bool, draft_size: int | None, min_pixels: int | None) -> Iterator[Item]:
        return (self.item(i, decode, draft_size, min_pixels) for i in range(len(self.entries)))

    def subset(self, rows: Sequence[int], note: str = "") -> FileCollection:
        out = FileCollection(self.spec, self.what, self.base, [self.entries[int(i)] for i in rows], self.deny,
                             self.read_timeout, self.pipe_timeout, self.list_file)
        out.chunk_size, out.listed, out.decoding = self.chunk_size, self.listed, self.decoding
        out.description = self.description + note if note else out.description
        if self.pixels is not None:
            out.pixels = self.pixels.subset(rows)
        return out

    def read_chunk(self, chunk: Chunk, draft: int = 0, workers: int = 0):
        ds = _ChunkFiles(self, range(chunk.start, chunk.stop), draft)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, shuffle=False,
                                             prefetch_factor=16 if workers else None)
        for row, item in loader:
            row = int(row)
            yield row, self.entries[row].key, self.entries[row].where, item

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for e in self.entries:
            h.update(e.key.encode("utf-8", "backslashreplace") + b"\n")
        return h.hexdigest()[:16]

    def provenance(self) -> dict:
        """What this collection reads, for RUN_DIR/data_provenance.json."""
        root = Path(self.spec)
        info: dict = {"path": str(root.resolve()), "files": self.listed, "kind": self.what}
        if self.list_file is not None:  # "who saw it" re-reads the list: record which one it was
            info["sha256"] = hashlib.sha256(self.list_file.read_bytes()).hexdigest()
        return {"source": str(root), "folder": info}


# ---------------------------------------------------------------- tar shards


class ShardCollection(Collection):
    """Tar shards: a stream with no random access, read in order (``items``, one chunk per shard) or
    dealt to training slots (data/batches.py's ``StreamBatches``).

    ``len`` (one virtual epoch) is ``epoch_samples`` when given, else ``limit``, else the sample
    count of the shards from the ``index.json`` that ``openseer shard`` writes beside them, else
    (local shards without an index) counted from the tar headers; ``pipe:`` shards without an index
    need ``data.epoch_samples``. It is worked out when first asked for.
    """

    kind = "shards"
    streaming = True

    def __init__(self, spec: str, urls: list[str], deny: DenyList, epoch_samples: int = 0, limit: int = 0,
                 pipe_timeout: float = PIPE_TIMEOUT, read_timeout: float | None = None):
        super().__init__(spec, deny)
        self.urls = urls
        local = [Path(u) for u in urls if not u.startswith("pipe:")]
        self.root = self.base = local[0].parent if local else None
        self.epoch_samples, self.limit = int(epoch_samples), int(limit)
        self.pipe_timeout = pipe_timeout
        self.read_timeout = default_read_timeout() if read_timeout is None else read_timeout
        self.index_path = self.root / INDEX if self.root and (self.root / INDEX).is_file() else None
        self.index: dict[str, int] = {}
        if self.index_path is not None:
            try:
                info = json.loads(self.index_path.read_text())
                self.index = {row["name"]: int(row["samples"]) for row in info.get("shards", [])}
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise DataError(f"shard index {self.index_path} is unreadable: {e}") from None
        self.manifest_path = self.root / MANIFEST if self.root and (self.root / MANIFEST).is_file() else None
        self.urls_digest = urls_digest(urls)
        self._epoch: tuple[int, str] | None = None
        self._sizes: list[int] | None = None
        self._chunks: list[Chunk] | None = None

    def shard_sizes(self) -> list[int]:
        """Samples per shard, from index.json or (local shards) counted from the tar headers."""
        if self._sizes is None:
            if not all(Path(u).name in self.index or not u.startswith("pipe:") for u in self.urls):
                raise DataError(f"cannot tell how many samples {self.spec!r} holds (pipe: shards and no "
                                f"{INDEX}): set data.epoch_samples=N, the number of samples per (virtual) epoch")
            self._sizes = [self.index[Path(u).name] if Path(u).name in self.index else count_samples(u)
                           for u in self.urls]
        return self._sizes

    def _epoch_size(self) -> tuple[int, str]:
        if self._epoch is None:
            n, how = self.epoch_samples or self.limit, "data.epoch_samples" if self.epoch_samples else "data.limit"
            if not n:
                n = sum(self.shard_sizes())
                how = f"from {INDEX}" if all(Path(u).name in self.index for u in self.urls) else "counted"
            if n < 1:
                raise DataError(f"the shards of {self.spec!r} hold no samples")
            self._epoch = (n, how)
        return self._epoch

    def __len__(self) -> int:
        return self._epoch_size()[0]

    @property  # type: ignore[override]
    def description(self) -> str:
        """Worked out when asked for (it needs the epoch size)."""
        n, how = self._epoch_size()
        return (f"tar shards {self.spec} ({len(self.urls)} shards, {n} samples per epoch {how}"
                f"{describe_denylist(self.deny)}, streamed)")

    def key(self, i: int) -> str:
        raise DataError("tar shards are a stream: samples have no index")

    def load(self, i: int, draft_size: int | None = None, min_pixels: int | None = None):
        raise DataError("tar shards are a stream: samples have no index")

    def subset(self, rows: Sequence[int], note: str = "") -> Collection:
        raise DataError(f"{self.spec}: tar shards are a stream and cannot be subset by row")

    def _items(self, decode: bool, draft_size: int | None, min_pixels: int | None) -> Iterator[Item]:
        for u, url in enumerate(self.urls):
            errors: list[str] = []
            name = Path(url).name
            for s in iter_shard(url, u, errors, self.pipe_timeout):
                it = Item(s.key, f"{name}#{s.key}", s.position, s.data, shard=url, reason=s.reason)
                if not it.reason and self.deny.denies(s.key, s.data):
                    it.reason, it.data = "denied", None
                if not it.reason and decode:
                    try:
                        it.image = decode_bytes(s.data or b"", it.where, draft_size=draft_size,
                                                min_pixels=min_pixels, decoding=self.decoding)
                    except BadImage as err:
                        it.reason, it.detail = err.reason, err.detail
                yield it
            for e in errors:  # the shard ended early: one counted error for the rest of it
                yield Item(f"{name}#error", url, -1, shard=url, reason="shard_error", detail=e)

    @property
    def chunks(self) -> list[Chunk]:
        """One chunk per shard (its sample count from index.json or the tar), up to ``limit`` rows."""
        if self._chunks is None:
            self._chunks, start = [], 0
            for i, (url, n) in enumerate(zip(self.urls, self.shard_sizes())):
                if self.limit:
                    n = min(n, self.limit - start)
                if n <= 0:
                    break
                self._chunks.append(Chunk(i, start, start + n, url))
                start += n
        return self._chunks

    @property
    def n(self) -> int:
        return self.chunks[-1].stop if self.chunks else 0

    def read_chunk(self, chunk: Chunk, draft: int = 0, workers: int = 0):
        errors: list[str] = []
        row = chunk.start
        name = Path(chunk.shard).name
        for s in iter_shard(chunk.shard, chunk.index, errors, self.pipe_timeout):
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
                                                                  draft_size=draft, decoding=self.decoding))
                except BadImage as e:
                    yield row, s.key, where, _reason(e, f"{name}:{s.key}")
            row += 1
        for r in range(row, chunk.stop):  # the shard ended early (damaged): the rest is missing
            detail = f": {errors[0]}" if errors else ""
            yield r, f"{name}:#{r - chunk.start}", chunk.shard, f"shard_error{detail}"

    def fingerprint(self) -> str:
        return f"{self.urls_digest}:{self.n}:{self.deny.version if self.deny.path else ''}"

    def provenance(self) -> dict:
        """What this collection reads, for RUN_DIR/data_provenance.json."""

        def file_info(path: Path | None) -> dict | None:
            if path is None:
                return None
            st = path.stat()
            out = {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
            if st.st_size <= 64 * 1024 * 1024:
                out["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            return out

        urls = [u if u.startswith("pipe:") else str(Path(u).resolve()) for u in self.urls]
        def size(url: str) -> int:  # takedown check names a shard whose size changed since
            try:
                return -1 if url.startswith("pipe:") else os.path.getsize(url)
            except OSError:
                return -1  # missing or unreadable: the stream reports it as a shard error

        sizes = [size(u) for u in urls]
        return {"source": self.spec, "shards": urls, "shards_digest": self.urls_digest, "shard_bytes": sizes,
                "index": file_info(self.index_path), "manifest": file_info(self.manifest_path),
                "epoch_samples": len(self)}


# ---------------------------------------------------------------- in-memory tensors (Fashion-MNIST)


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HELP = (
    "Fashion-MNIST was not found in {where}. Install it with "
    "`apt-get install -y dataset-fashion-mnist` (Debian; puts the idx files in "
    "/usr/share/datasets/fashion-mnist), or pass --data PATH to a folder holding "
    "train-images-idx3-ubyte[.gz] and friends."
)
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path} is not a uint8 idx file")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(dims)


def find_idx(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` or ``folder/stem.gz`` (an idx file of Fashion-MNIST), or None."""
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def is_fashion_mnist(spec: str) -> bool:
    """True for ``'fashion-mnist'`` and for a folder holding its idx files."""
    path = Path(spec).expanduser()
    return spec == "fashion-mnist" or (path.is_dir() and find_idx(path, "train-images-idx3-ubyte") is not None)


def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 (N, 1, 28, 28) and labels as int64 (N,), from the idx files."""
    folder = Path(root) if root else Path(os.environ.get("OPENSEER_FASHION_MNIST", FASHION_MNIST_DIR))
    prefix = "train" if split == "train" else "t10k"
    img_path = find_idx(folder, f"{prefix}-images-idx3-ubyte")
    lbl_path = find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    if img_path is None or lbl_path is None:
        raise DataError(FASHION_MNIST_HELP.format(where=folder))
    images = torch.from_numpy(_read_idx(img_path).copy()).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(lbl_path).astype(np.int64))
    return images, labels


class TensorCollection(Collection):
    """In-memory uint8 images (N, C, H, W), e.g. Fashion-MNIST; never bad, never deny-listed.

    Row keys are ``keys`` when given, else ``NAME:SPLIT:i`` (``fashion-mnist:train:17``, as eval and
    embed record them); training batches report ``NAME:i``. ``i`` is the row in the original tensor
    (``rows`` after a subset)."""

    kind = "memory"
    in_memory = True

    def __init__(self, images: torch.Tensor, name: str, labels: torch.Tensor | None = None,
                 split: str = "train", keys: list[str] | None = None, rows: list[int] | None = None):
        super().__init__(name)
        self.images, self.labels, self.name, self.split = images, labels, name, split
        self._keys, self._rows = keys, rows
        self.description = f"{name} ({len(images)} images, {tuple(images.shape[1:])} uint8, in memory)"

    def __len__(self) -> int:
        return len(self.images)

    def _row(self, i: int) -> int:
        return self._rows[i] if self._rows is not None else i

    def key(self, i: int) -> str:
        return self._keys[i] if self._keys is not None else f"{self.name}:{self.split}:{self._row(i)}"

    def batch_key(self, i: int) -> str:
        return f"{self.name}:{self._row(i)}"

    def load(self, i: int, draft_size: int | None = None, min_pixels: int | None = None) -> torch.Tensor:
        return self.images[i]

    def _items(self, decode: bool, draft_size: int | None, min_pixels: int | None) -> Iterator[Item]:
        for i in range(len(self)):
            yield Item(self.key(i), self.key(i), i, image=self.images[i] if decode else None)

    def subset(self, rows: Sequence[int], note: str = "") -> TensorCollection:
        picked = [int(i) for i in rows]
        idx = torch.as_tensor(picked, dtype=torch.int64)
        labels = self.labels[idx] if self.labels is not None else None
        keys = [self._keys[i] for i in picked] if self._keys is not None else None
        out = TensorCollection(self.images[idx], self.name, labels, self.split, keys,
                               [self._row(i) for i in picked])
        out.chunk_size, out.decoding = self.chunk_size, self.decoding
        if note:
            out.description = self.description + note
        return out

    def read_chunk(self, chunk: Chunk, draft: int = 0, workers: int = 0):
        for row in range(chunk.start, chunk.stop):
            yield row, self.key(row), "", self.images[row]

    def fingerprint(self) -> str:
        return hashlib.sha256(self.images.contiguous().numpy().tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------- the one opener


def open_denylist(denylist: str, root: Path | None) -> DenyList:
    """The deny-list a collection applies: ``denylist`` or, when empty, ``takedowns.txt`` in ``root``."""
    path = denylist or (str(root / DEFAULT_DENYLIST) if root and (root / DEFAULT_DENYLIST).is_file() else "")
    try:
        return DenyList.load(path)
    except TakedownError as e:
        raise DataError(str(e)) from None


def expand_frames(entries: list[Entry], read_timeout: float) -> list[Entry]:
    """``data.dicom_frames=all``: each multi-frame DICOM file's entry replaced by one per frame
    (its header read once, in bounded time; a file whose header cannot be read stays one entry,
    and its reason is counted when it is read)."""
    out: list[Entry] = []
    for e in entries:
        n = dicom_frame_count(e.path, read_timeout) if e.name.lower().endswith(DICOM_EXTENSIONS) else 1
        out += [Entry(e.name, e.path, f) for f in range(n)] if n > 1 else [e]
    return out


def _files(spec: str, path: Path, denylist: str, read_timeout: float, pipe_timeout: float,
           frames: str = "middle") -> FileCollection:
    if path.is_dir():
        names = list_folder(path)
        if not names:
            raise DataError(f"no images found under {spec} (looked recursively for files named "
                            f"{', '.join(IMAGE_EXTENSIONS)}, in any case)")
        entries = [Entry(n, path / n) for n in names]
        return FileCollection(spec, "folder", path, expand_frames(entries, read_timeout) if frames == "all" else entries,
                              open_denylist(denylist, path), read_timeout, pipe_timeout)
    if path.is_file():
        names = read_file_list(path)
        if not names:
            raise DataError(f"the file list {spec} names no files (one image path per line)")
        entries = [Entry(n, Path(n) if os.path.isabs(n) else path.parent / n) for n in names]
        if frames == "all":
            entries = expand_frames(entries, read_timeout)
        return FileCollection(spec, "file list", path.parent, entries, open_denylist(denylist, path.parent),
                              read_timeout, pipe_timeout, list_file=path)
    if path.exists() or path.is_symlink():
        raise DataError(f"{spec} is neither a folder nor a file list (give a folder of images, a text file "
                        f"listing image paths, tar shards, or 'fashion-mnist')")
    raise DataError(f"{spec} does not exist (give a folder of images, a text file listing image paths, "
                    f"tar shards, or 'fashion-mnist')")


def default_dicom(data_cfg: DataConfig | None = None) -> tuple[str, str]:
    """(window, frames): ``data_cfg``'s ``dicom_window`` and ``dicom_frames`` when given, else
    ``$OPENSEER_DICOM_WINDOW`` / ``$OPENSEER_DICOM_FRAMES``, else the defaults (auto, middle)."""
    if data_cfg is not None:
        window, frames = data_cfg.dicom_window, data_cfg.dicom_frames
    else:
        window = os.environ.get("OPENSEER_DICOM_WINDOW", "") or DataConfig.dicom_window
        frames = os.environ.get("OPENSEER_DICOM_FRAMES", "") or DataConfig.dicom_frames
    parse_window(window)  # a DataError naming the value when it is not auto, none or C,W
    if frames not in ("middle", "all"):
        raise DataError(f"data.dicom_frames (or $OPENSEER_DICOM_FRAMES) must be middle or all; got {frames!r}")
    return window, frames


def open_collection(spec: str, limit: int = 0, denylist: str = "", read_timeout: float | None = None,
                    pipe_timeout: float | None = None, epoch_samples: int = 0, shards: bool | None = None,
                    chunk_size: int = CHUNK_SIZE, data_cfg: DataConfig | None = None,
                    channels: int = 3) -> Collection:
    """Open ``--data``: a folder (recursive), a file list (one image path per line), tar shards (a
    ``.tar`` path, brace range or glob, ``pipe:CMD``, a folder written by ``openseer shard``, joined
    by ``::``), or Fashion-MNIST (``fashion-mnist`` or a folder holding its idx files).

    ``data_cfg`` (a DataConfig) supplies ``denylist``, ``read_timeout``, ``pipe_timeout``,
    ``epoch_samples``, ``dicom_window`` and ``dicom_frames`` where they are not given (without it:
    ``$OPENSEER_DICOM_WINDOW``, ``$OPENSEER_DICOM_FRAMES``); ``channels`` is ``model.in_chans``
    (1: full-depth grey images, 3: RGB; the module docstring); ``limit`` keeps the first N rows (shards: N samples
    per epoch). ``shards=False`` opens only a folder or a file list, ``shards=True`` only shards. A
    missing path, a folder without image names or an empty list is a ``DataError`` saying so.
    """
    if data_cfg is not None:
        denylist = denylist or data_cfg.denylist
        read_timeout = data_cfg.read_timeout if read_timeout is None else read_timeout
        pipe_timeout = data_cfg.pipe_timeout if pipe_timeout is None else pipe_timeout
        epoch_samples = epoch_samples or data_cfg.epoch_samples
    read_timeout = default_read_timeout() if read_timeout is None else float(read_timeout)
    pipe_timeout = PIPE_TIMEOUT if pipe_timeout is None else float(pipe_timeout)
    if channels not in (1, 3):
        raise DataError(f"model.in_chans must be 1 or 3 for a pile of images; got {channels}")
    window, frames = default_dicom(data_cfg)
    decoding = Decoding(int(channels), window)
    if not spec:
        raise DataError("no data given: pass --data PATH (a folder of images, a text file listing image paths, "
                        "tar shards) or --data fashion-mnist")
    if shards or (shards is None and looks_like_shards(spec)):
        urls = expand_spec(spec)
        local = [Path(u) for u in urls if not u.startswith("pipe:")]
        shard_coll = ShardCollection(spec, urls, open_denylist(denylist, local[0].parent if local else None),
                                     epoch_samples, limit, pipe_timeout, read_timeout)
        shard_coll.decoding = decoding
        return shard_coll
    path = Path(spec).expanduser()
    coll: Collection
    if shards is None and is_fashion_mnist(spec):
        images, labels = load_fashion_mnist("train", None if spec == "fashion-mnist" else path)
        coll = TensorCollection(images, "fashion-mnist", labels)
    elif shards is None and path.is_file() and is_image_name(path.name):
        raise DataError(f"data path {spec!r} is one image, not a folder or a file list (give a folder of "
                        f"images, a text file listing image paths, tar shards, or 'fashion-mnist')")
    else:
        coll = _files(spec, path, denylist, read_timeout, pipe_timeout, frames)
    coll.chunk_size, coll.decoding = chunk_size, decoding
    if limit and not coll.streaming and limit < len(coll):  # shards: limit is the epoch (above)
        coll = coll.head(limit)
    return coll


def require_usable(coll: Collection | str, skips: SkipCounts) -> None:
    """A ``DataError`` (one clear message) when nothing usable was read; else nothing."""
    if skips.read:
        return
    spec = coll.spec if isinstance(coll, Collection) else coll
    if not skips.skipped:
        raise DataError(f"no images in {spec}")
    examples = "; ".join(f"{r}: {', '.join(w)}" for r, w in sorted(skips.examples.items()))
    raise DataError(f"no usable image in {spec}: all {skips.skipped} were skipped ({skips.summary()}); "
                    f"e.g. {examples}")


def report_skips(skips: SkipCounts, what: str = "openseer") -> None:
    """One line on stderr: how many were read and skipped, by reason."""
    print(f"{what}: {skips.summary()}", file=sys.stderr)
