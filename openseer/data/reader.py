"""One way to read a collection: list it, read each file in bounded time, decode, apply the deny-list.

Every command that takes a folder, a file list or tar shards (``pretrain``, ``eval``, ``embed``,
``shard``, ``data report``, ``takedown``, ``report --data``, ``curate``, ``distill``) reads it here,
so they all see the same files, skip the same ones for the same reasons, and count them alike::

    coll = open_collection("/photos")            # a folder (recursive), a file list, or tar shards
    skips = SkipCounts()
    for item in coll.items(skips=skips):         # every entry in order; item.image is RGB, or None
        if item.reason: continue                 # ... and item.reason says why (see REASONS)
    print(skips.summary(), file=sys.stderr)      # "12 read, 19 skipped: empty 1, truncated 3, ..."
    require_usable(coll, skips)                  # DataError when nothing usable was found

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
run goes on (the stuck read is left to a daemon thread). FIFOs and devices are refused before
reading (``not_a_file``). ``pipe:`` shards use ``data.pipe_timeout`` (a command silent that long is
stopped; its shard ends as ``shard_error``).
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ..config import DataConfig
from ..fileio import name_to_text, read_list
from .decode import IMAGE_EXTENSIONS, BadImage, DataError, decode_bytes, read_file
from .denylist import DenyList, TakedownError
from .stream import DEFAULT_DENYLIST, PIPE_TIMEOUT, expand_spec, iter_shard, looks_like_shards

READ_TIMEOUT = DataConfig.read_timeout

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
    "denied": "on the deny-list",
    "no_image": "a shard sample without an image member",
    "shard_error": "a damaged tar, or a pipe: command that failed or stalled; the rest of that shard is lost",
    "shard_changed": "a sample buffered at a checkpoint that is no longer in its shard",
}

T = TypeVar("T")


def default_read_timeout() -> float:
    """``$OPENSEER_READ_TIMEOUT`` when set (seconds, > 0), else ``data.read_timeout``'s default."""
    text = os.environ.get("OPENSEER_READ_TIMEOUT", "")
    if not text:
        return READ_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"OPENSEER_READ_TIMEOUT must be a number of seconds; got {text!r}") from None
    if value <= 0:
        raise DataError(f"OPENSEER_READ_TIMEOUT must be > 0 seconds; got {text!r}")
    return value


class _Readers:
    """Daemon threads that run reads for ``call_with_timeout``, started as needed and reused.

    A caller reserves an idle thread (or starts one), hands it the job and waits for the answer up
    to the timeout. A thread stuck in a read is never idle again, so no later read waits behind it.
    """

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.idle = 0

    def reset(self) -> None:  # in a forked child: the parent's threads do not exist there
        self.__init__()

    def call(self, fn: Callable[[], T], timeout: float) -> tuple[bool, object]:
        reply: queue.SimpleQueue = queue.SimpleQueue()
        with self.lock:
            if self.idle:
                self.idle -= 1
            else:
                threading.Thread(target=self._serve, name="openseer-read", daemon=True).start()
        self.jobs.put((fn, reply))
        return reply.get(timeout=timeout)

    def _serve(self) -> None:
        while True:
            fn, reply = self.jobs.get()
            try:
                reply.put((True, fn()))
            except BaseException as e:  # handed to the caller's thread
                reply.put((False, e))
            with self.lock:
                self.idle += 1


_READERS = _Readers()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_READERS.reset)


def call_with_timeout(fn: Callable[[], T], timeout: float, what: str) -> T:
    """``fn()``, or ``BadImage('timeout')`` when it has not returned after ``timeout`` seconds.

    ``fn`` runs in a daemon thread: a read stuck in the kernel cannot be interrupted, so it is left
    behind (it ends if the file system ever answers, and never keeps the process from exiting).
    """
    try:
        ok, value = _READERS.call(fn, timeout)
    except queue.Empty:
        raise BadImage("timeout", f"{what}: no answer after {timeout:g} s (data.read_timeout)") from None
    if not ok:
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]


def read_bytes(path: str | os.PathLike, timeout: float | None = None) -> bytes:
    """The bytes of one image file, read in bounded time; ``BadImage`` with a reason otherwise."""
    timeout = default_read_timeout() if timeout is None else timeout
    return call_with_timeout(lambda: read_file(path), timeout, os.fsdecode(path))


# ---------------------------------------------------------------- listing


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


@dataclass(frozen=True)
class Entry:
    """One listed file: ``name`` as listed (relative to the folder, or the list's line), ``path`` to open."""

    name: str
    path: Path

    @property
    def key(self) -> str:
        """The name as one line of text (record files, deny-list keys, messages)."""
        return name_to_text(self.name)


@dataclass
class Item:
    """One entry or shard sample as read: an RGB image (``decode=True``), the bytes, or why not."""

    key: str  # name text (files) or sample key (shards)
    where: str  # the path, or 'shard.tar#key', as text
    index: int = -1  # position in the listing (files) or in its shard (shards)
    data: bytes | None = None
    image: object = None  # PIL RGB image when decoded
    reason: str = ""
    detail: str = ""
    shard: str = ""  # the shard URL (shards)

    @property
    def ok(self) -> bool:
        return not self.reason


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


class Collection:
    """A listed collection: files (a folder or a file list) or tar shards, and its deny-list."""

    def __init__(self, spec: str, kind: str, base: Path | None, entries: list[Entry], urls: list[str],
                 deny: DenyList, read_timeout: float, pipe_timeout: float):
        self.spec, self.kind, self.base = spec, kind, base
        self.entries, self.urls, self.deny = entries, urls, deny
        self.read_timeout, self.pipe_timeout = read_timeout, pipe_timeout
        what = f"{len(entries)} files" if kind != "shards" else f"{len(urls)} shards"
        deny_text = f", deny-list {deny.path} ({len(deny)} keys)" if deny.path else ""
        self.description = f"{kind} {spec} ({what}{deny_text})"

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def streaming(self) -> bool:
        return self.kind == "shards"

    def read(self, i: int) -> bytes:
        """The bytes of entry ``i`` (bounded time, deny-list applied); ``BadImage`` with a reason."""
        e = self.entries[i]
        data = read_bytes(e.path, self.read_timeout)
        if self.deny.keys and (self.deny.denies(e.key, data) or self.deny.denies(e.name)):
            raise BadImage("denied", e.key)
        return data

    def load(self, i: int, draft_size: int | None = None, min_pixels: int | None = None):
        """Entry ``i`` decoded to RGB (PIL); ``BadImage`` with a reason."""
        return decode_bytes(self.read(i), os.fsdecode(self.entries[i].path), draft_size=draft_size,
                            min_pixels=min_pixels)

    def item(self, i: int, decode: bool = True, draft_size: int | None = None,
             min_pixels: int | None = None) -> Item:
        """Entry ``i`` as an ``Item`` (never raises for a bad file)."""
        e = self.entries[i]
        out = Item(e.key, name_to_text(e.path), i)
        try:
            out.data = self.read(i)
            if decode:
                out.image = decode_bytes(out.data, out.where, draft_size=draft_size, min_pixels=min_pixels)
        except BadImage as err:
            out.reason, out.detail, out.data = err.reason, err.detail, None
        return out

    def items(self, decode: bool = True, draft_size: int | None = None, min_pixels: int | None = None,
              skips: SkipCounts | None = None) -> Iterator[Item]:
        """Every entry (or shard sample) in order; bad ones carry a reason and are counted in ``skips``."""
        source = self._shard_items(decode, draft_size, min_pixels) if self.streaming else (
            self.item(i, decode, draft_size, min_pixels) for i in range(len(self.entries)))
        for it in source:
            if skips is not None:
                skips.skip(it.reason, it.where) if it.reason else skips.good()
            yield it

    def _shard_items(self, decode: bool, draft_size: int | None, min_pixels: int | None) -> Iterator[Item]:
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
                                                min_pixels=min_pixels)
                    except BadImage as err:
                        it.reason, it.detail = err.reason, err.detail
                yield it
            for e in errors:  # the shard ended early: one counted error for the rest of it
                yield Item(f"{name}#error", url, -1, shard=url, reason="shard_error", detail=e)


def open_denylist(denylist: str, root: Path | None) -> DenyList:
    """The deny-list a collection applies: ``denylist`` or, when empty, ``takedowns.txt`` in ``root``."""
    path = denylist or (str(root / DEFAULT_DENYLIST) if root and (root / DEFAULT_DENYLIST).is_file() else "")
    try:
        return DenyList.load(path)
    except TakedownError as e:
        raise DataError(str(e)) from None


def open_collection(spec: str, denylist: str = "", read_timeout: float | None = None,
                    pipe_timeout: float | None = None, shards: bool | None = None) -> Collection:
    """List ``spec``: a folder (recursive), a file list, or tar shards (anything ``--data`` takes for
    them: brace ranges, globs, ``pipe:CMD``, a folder written by ``openseer shard``, joined by ``::``).

    ``shards=None`` tells shards from files by the spec; a folder without image names, a missing
    path or an empty list is a ``DataError`` saying so."""
    read_timeout = default_read_timeout() if read_timeout is None else float(read_timeout)
    pipe_timeout = (PIPE_TIMEOUT if pipe_timeout is None else float(pipe_timeout))
    if not spec:
        raise DataError("no data given: pass a folder of images, a text file listing image paths, or tar shards")
    if shards or (shards is None and looks_like_shards(spec)):
        urls = expand_spec(spec)
        local = [Path(u) for u in urls if not u.startswith("pipe:")]
        root = local[0].parent if local else None
        return Collection(spec, "shards", root, [], urls, open_denylist(denylist, root), read_timeout, pipe_timeout)
    path = Path(spec).expanduser()
    if path.is_dir():
        names = list_folder(path)
        if not names:
            raise DataError(f"no images found under {spec} (looked recursively for files named "
                            f"{', '.join(IMAGE_EXTENSIONS)}, in any case)")
        entries = [Entry(n, path / n) for n in names]
        return Collection(spec, "folder", path, entries, [], open_denylist(denylist, path), read_timeout, pipe_timeout)
    if path.is_file():
        names = read_file_list(path)
        if not names:
            raise DataError(f"the file list {spec} names no files (one image path per line)")
        entries = [Entry(n, Path(n) if os.path.isabs(n) else path.parent / n) for n in names]
        return Collection(spec, "file list", path.parent, entries, [], open_denylist(denylist, path.parent),
                          read_timeout, pipe_timeout)
    if path.exists() or path.is_symlink():
        raise DataError(f"{spec} is neither a folder nor a file list")
    raise DataError(f"{spec} does not exist (give a folder of images, a text file listing image paths, "
                    f"or tar shards)")


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
