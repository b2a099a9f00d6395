"""Streaming tar shards (webdataset): deterministic per-slot streams whose position is checkpointed.

A shard spec is what ``--data`` accepts for web-scale data: ``shards/{000000..000099}.tar``
(brace ranges), ``shards/*.tar`` (globs), ``pipe:CMD`` (the command's stdout is a tar, e.g.
``pipe:curl -s https://host/s/{0000..0099}.tar`` or ``pipe:aws s3 cp s3://b/s/000001.tar -``),
a folder written by ``openseer shard`` (its ``*.tar``), or several of these joined by ``::``.
URLs are expanded and read with webdataset (``expand_urls``, ``tarfile_samples``); a ``pipe:`` command's
output is read through ``StallGuardedPipe``, so a command that hangs is stopped after ``data.pipe_timeout``.

How samples are dealt out (see docs/data.md for the guarantees):

* A *slot* is one (rank, loader worker) pair; a run has ``world_size x slots_per_rank`` of them,
  fixed when the run starts (``slots_per_rank = max(data.num_workers, 1)``).
* Pass ``p`` over the data permutes the shard list with ``(seed, p)`` and gives shard ``i`` of the
  permutation to slot ``i mod n_slots``. Each slot reads its shards in order, drops deny-listed
  samples, and shuffles through a buffer of ``data.shuffle_buffer`` samples (seeded by
  ``(seed, p, slot)``, emptied at the end of each pass). So every sample is read exactly once per
  pass, and a slot's stream is a pure function of (seed, pass, slot).
* Step ``t`` on a rank takes its whole per-rank batch from local slot ``t mod slots_per_rank``.
* A slot's position (pass, shard, sample, the (shard, sample) references waiting in the shuffle
  buffer, the buffer RNG) travels with every batch; the batch iterator keeps the position after
  the last batch handed to training, and the checkpoint stores it. A resumed run re-opens at most
  the shards the buffer references and continues: no sample repeated, none skipped.
* Resuming on another world size re-deals the work left (``redeal``): the shards, part-shards and
  buffered samples every old slot still had to read in the passes begun so far become *pieces*,
  dealt to the new slots by least work, which read them first; then every new slot starts the next
  pass on the new layout. So each sample is still read exactly once per pass.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import io
import os
import random
import select
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import DataConfig
from .decode import IMAGE_EXTENSIONS, DataError
from .denylist import DenyList

SAMPLE_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
INDEX = "index.json"
MANIFEST = "manifest.csv"
DEFAULT_DENYLIST = "takedowns.txt"
PIPE_TIMEOUT = DataConfig.pipe_timeout  # seconds a ``pipe:`` command may go without sending a byte


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _rng_state(rng: random.Random) -> list:
    """A shuffle RNG's state as plain lists (it travels in checkpoints)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def looks_like_shards(spec: str) -> bool:
    """Whether ``--data`` names tar shards rather than a folder of images or Fashion-MNIST."""
    if spec.startswith("pipe:") or "::" in spec:
        return True
    if spec.endswith(".tar") or ".tar}" in spec or spec.endswith((".tar'", '.tar"')):
        return True
    path = Path(spec).expanduser()
    if path.is_dir():
        return (path / INDEX).is_file() or (path / MANIFEST).is_file() and any(path.glob("*.tar"))
    return any(ch in spec for ch in "*?[") and ".tar" in spec


def expand_spec(spec: str) -> list[str]:
    """Shard URLs of a spec, in order: braces expanded (webdataset), globs sorted, folders listed."""
    import webdataset as wds

    urls: list[str] = []
    missing: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            continue
        for url in wds.shardlists.expand_urls(part):
            if url.startswith("pipe:"):
                urls.append(url)
                continue
            path = Path(url).expanduser()
            if any(ch in url for ch in "*?["):
                hits = sorted(glob.glob(str(path)))
                if not hits:
                    missing.append(url)
                urls += hits
            elif path.is_dir():
                hits = sorted(str(p) for p in path.glob("*.tar"))
                if not hits:
                    raise DataError(f"{path} holds no *.tar shards")
                urls += hits
            elif path.is_file():
                urls.append(str(path))
            else:
                missing.append(url)
    if missing:
        raise DataError(f"{len(missing)} shard(s) of {spec!r} do not exist, e.g. {missing[0]}")
    if not urls:
        raise DataError(f"no shards found for {spec!r}")
    return urls


def slot_shards(n_urls: int, seed: int, pass_: int, slot: int, n_slots: int) -> list[int]:
    """Shard indices that ``slot`` reads in pass ``pass_``, in reading order."""
    rng = np.random.Generator(np.random.PCG64(_seed(seed, pass_, 0x5A4D)))
    perm = rng.permutation(n_urls).tolist()
    return perm[slot::n_slots]


@dataclass
class RawSample:
    """One sample as read from a tar: where it came from and its image bytes (or why not)."""

    url_index: int
    position: int  # sample number inside its shard (0-based, in tar order)
    key: str
    data: bytes | None = None
    reason: str = ""  # why it cannot be used ('denied', 'no_image', 'shard_error')


class StallGuardedPipe(io.RawIOBase):
    """The stdout of a ``pipe:`` command, read with a stall limit.

    A command that sends nothing for ``timeout`` seconds (a hung object-store client, a stalled
    network) is killed with its process group and the read raises ``TimeoutError``; a command that
    exits non-zero raises ``OSError`` at the end of its output. Either ends the shard as a counted
    ``shard_error`` instead of hanging the run (webdataset's own pipe reader blocks forever).
    """

    def __init__(self, cmd: str, timeout: float = PIPE_TIMEOUT):
        self.cmd, self.timeout = cmd, timeout
        self.proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, bufsize=0, start_new_session=True)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        fd = self.proc.stdout.fileno()
        if not select.select([fd], [], [], self.timeout)[0]:
            self._kill()
            raise TimeoutError(f"pipe command sent no data for {self.timeout:g} s and was stopped: {self.cmd}")
        data = os.read(fd, len(buffer))
        if not data and self.proc.wait() != 0:
            raise OSError(f"pipe command exited with status {self.proc.returncode}: {self.cmd}")
        buffer[:len(data)] = data
        return len(data)

    def _kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        if not self.closed:
            self._kill()  # a tar read to its end-of-archive marker may leave the command running
            self.proc.stdout.close()
        super().close()


def iter_shard(url: str, url_index: int, errors: list[str] | None = None,
               pipe_timeout: float = PIPE_TIMEOUT) -> Iterator[RawSample]:
    """Samples of one shard, in tar order. Tar or pipe errors, and a ``pipe:`` command silent for
    ``pipe_timeout`` seconds, end the shard and are appended to ``errors`` (never raised)."""
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def handler(exn: Exception) -> bool:
        if errors is not None:
            errors.append(f"{type(exn).__name__}: {str(exn.args[0]) if exn.args else exn}"[:300])
        return True

    position = 0
    pipe = None
    try:
        if url.startswith("pipe:"):
            pipe = io.BufferedReader(StallGuardedPipe(url[len("pipe:"):], pipe_timeout))
            samples = group_by_keys(tar_file_expander([{"url": url, "stream": pipe}], handler=handler),
                                    handler=handler)
        else:
            samples = wds.tarfile_samples([{"url": url}], handler=handler)
        for sample in samples:
            key = str(sample.get("__key__", ""))
            ext = next((e for e in SAMPLE_IMAGE_EXTS if e in sample), None)
            data = sample[ext] if ext else None
            yield RawSample(url_index, position, key, data, "" if ext else "no_image")
            position += 1
    except Exception as e:  # a broken pipe or tar that webdataset's handler did not catch
        handler(e)
    finally:
        if pipe is not None:
            pipe.close()


def count_samples(path: str) -> int:
    """Samples in a local tar, from its headers only (grouped by key as webdataset groups them)."""
    import tarfile

    from webdataset.tariterators import base_plus_ext

    n, last = 0, None
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                prefix, _ = base_plus_ext(member.name)
                if prefix is not None and prefix != last:
                    n, last = n + 1, prefix
    except (OSError, tarfile.TarError, EOFError):
        pass  # a damaged shard counts what could be read; the reader reports the damage
    return n


def scan_shard_keys(url: str) -> list[str]:
    """Sample keys of a shard in order (for audits)."""
    return [s.key for s in iter_shard(url, 0)]


class SlotStream:
    """The infinite, deterministic sample stream of one slot; ``state()`` after any sample."""

    def __init__(self, urls: list[str], seed: int, slot: int, n_slots: int, buffer_size: int,
                 deny: DenyList, state: dict | None = None, pipe_timeout: float = PIPE_TIMEOUT):
        self.urls, self.seed, self.slot, self.n_slots = urls, seed, slot, n_slots
        self.pipe_timeout = pipe_timeout
        self.buffer_size = max(int(buffer_size), 1)
        self.deny = deny
        self.pass_, self.shard, self.pos = 0, 0, 0
        self.extra: list[list[int]] = []  # [url_index, from position] pieces to read before the pass
        self.draining = False  # reading pieces dealt by ``redeal``, or emptying the buffer after them
        self.buffer: list[RawSample] = []
        self.rng = random.Random(_seed(seed, 0, slot, 0xB0F))
        self.reports: list[tuple[str, str]] = []  # (key, reason) of samples dropped since last take
        self._resume = state
        self._gen = self._run()

    # -- state ---------------------------------------------------------------------------------
    def state(self) -> dict:
        if self._resume is not None:  # not read since it was restored: still the state it was given
            return copy.deepcopy(self._resume)
        out = {"pass": self.pass_, "shard": self.shard, "pos": self.pos,
               "buffer": [[s.url_index, s.position] for s in self.buffer], "rng": _rng_state(self.rng)}
        if self.draining:
            out["extra"] = [list(piece) for piece in self.extra]
        return out

    def take_reports(self) -> list[tuple[str, str]]:
        out, self.reports = self.reports, []
        return out

    def __next__(self) -> RawSample:
        return next(self._gen)

    def __iter__(self) -> Iterator[RawSample]:
        return self

    # -- reading -------------------------------------------------------------------------------
    def _admit(self, s: RawSample, errors: list[str]) -> RawSample | None:
        url = self.urls[s.url_index]
        if s.reason:
            self.reports.append((f"{Path(url).name}:{s.key}", s.reason))
            return None
        if self.deny.denies(s.key, s.data):
            self.reports.append((f"{Path(url).name}:{s.key}", "denied"))
            return None
        return s

    def _flush_errors(self, errors: list[str], url: str) -> None:
        for e in errors:
            self.reports.append((f"{url}: {e}", "shard_error"))
        errors.clear()

    def _restore(self, state: dict) -> tuple[Iterator[RawSample] | None, list[str]]:
        """Rebuild the buffer from the referenced samples; returns the rest of the current shard."""
        self.pass_, self.shard, self.pos = int(state["pass"]), int(state["shard"]), int(state["pos"])
        self.extra = [[int(u), int(p)] for u, p in state.get("extra", [])]
        self.draining = "extra" in state
        version, internal, gauss = state["rng"]
        self.rng.setstate((int(version), tuple(int(x) for x in internal), gauss))
        wanted = [(int(u), int(p)) for u, p in state["buffer"]]
        if self.extra:
            current, pos = self.extra[0]
        else:
            mine = slot_shards(len(self.urls), self.seed, self.pass_, self.slot, self.n_slots)
            current, pos = (mine[self.shard] if self.shard < len(mine) else None), self.pos
        found: dict[tuple[int, int], RawSample] = {}
        need: dict[int, set[int]] = {}
        for u, p in wanted:
            need.setdefault(u, set()).add(p)
        for u, positions in need.items():
            if u == current and max(positions) < pos:  # found while skipping to the position below
                continue
            errors: list[str] = []
            for s in iter_shard(self.urls[u], u, errors, self.pipe_timeout):
                if s.position in positions:
                    found[(u, s.position)] = s
                    if len(positions) == sum(1 for k in found if k[0] == u):
                        break
        tail: Iterator[RawSample] | None = None  # None: no shard half read (a pass ended exactly here)
        tail_errors: list[str] = []
        if current is not None:
            it = iter_shard(self.urls[current], current, tail_errors, self.pipe_timeout)
            positions = need.get(current, set())
            if pos > 0:
                for s in it:
                    if s.position in positions:
                        found[(current, s.position)] = s
                    if s.position + 1 >= pos:
                        break
            tail = it
        dropped: list[tuple[str, str]] = []
        self.buffer = []
        for u, p in wanted:
            s = found.get((u, p))
            if s is None:
                dropped.append((f"{Path(self.urls[u]).name}:#{p}", "shard_changed"))
                continue
            if self._admit(s, []) is not None:
                self.buffer.append(s)
        self.reports += dropped
        return tail, tail_errors

    def _run(self) -> Iterator[RawSample]:
        tail: Iterator[RawSample] | None = None
        tail_errors: list[str] = []
        if self._resume:
            tail, tail_errors = self._restore(self._resume)
            self._resume = None
        if self.draining:
            yield from self._drain(tail, tail_errors)
            tail = None
        while True:
            mine = slot_shards(len(self.urls), self.seed, self.pass_, self.slot, self.n_slots)
            from_start = self.shard == 0 and self.pos == 0 and not self.buffer
            if from_start:  # nothing of this pass drawn yet: its own shuffle order
                self.rng = random.Random(_seed(self.seed, self.pass_, self.slot, 0xB0F))
            got_any = False
            while self.shard < len(mine):
                u = mine[self.shard]
                errors: list[str] = tail_errors if tail is not None else []
                it = tail if tail is not None else iter_shard(self.urls[u], u, errors, self.pipe_timeout)
                tail = None
                for s in it:
                    self.pos = s.position + 1
                    s = self._admit(s, errors)
                    if s is None:
                        continue
                    got_any = True
                    self.buffer.append(s)
                    if len(self.buffer) >= self.buffer_size:
                        yield self._pop()
                self._flush_errors(errors, self.urls[u])
                self.shard, self.pos = self.shard + 1, 0
            while self.buffer:
                yield self._pop()
            if from_start and not got_any:
                raise DataError(f"loader slot {self.slot} found no usable sample in a whole pass over its "
                                f"{len(mine)} shard(s) (empty, unreadable, no images, or all deny-listed)")
            self.pass_, self.shard, self.pos = self.pass_ + 1, 0, 0

    def _drain(self, tail: Iterator[RawSample] | None, tail_errors: list[str]) -> Iterator[RawSample]:
        """Read the pieces dealt to this slot by ``redeal`` (each from its start position), then
        empty the buffer: the passes begun before the world size changed end here."""
        while self.extra:
            u, start = self.extra[0]
            errors: list[str] = tail_errors if tail is not None else []
            it = tail if tail is not None else iter_shard(self.urls[u], u, errors, self.pipe_timeout)
            tail = None
            for s in it:
                if s.position < start:
                    continue
                self.extra[0] = [u, s.position + 1]
                s = self._admit(s, errors)
                if s is None:
                    continue
                self.buffer.append(s)
                if len(self.buffer) >= self.buffer_size:
                    yield self._pop()
            self._flush_errors(errors, self.urls[u])
            self.extra.pop(0)
        while self.buffer:
            yield self._pop()
        self.draining = False

    def _pop(self) -> RawSample:
        j = self.rng.randrange(len(self.buffer))
        self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
        return self.buffer.pop()


def redeal(states: list[dict | None], n_urls: int, seed: int, n_new: int,
           shard_size: float = 1.0) -> tuple[list[dict], dict]:
    """Stream positions for ``n_new`` slots that finish what ``states`` (one per old slot, in slot
    order; ``None`` = never read) had left of the passes begun so far.

    Left of old slot ``s`` at pass ``p`` (the furthest slot is at ``P``): its own pieces not yet
    read, the rest of its current shard, its later shards of pass ``p``, and all its shards of the
    passes ``p + 1 .. P``. Each old slot's buffered samples go to new slot ``s mod n_new``; then
    each piece, in order, goes to the new slot with the least work so far (a piece from position
    ``k`` of a shard counts as ``shard_size - k`` samples), so the new slots finish their share of
    the old passes at about the same step. Every new slot reads its pieces, empties its
    buffer, then starts pass ``P + 1`` on the new layout. Returns (new states, ``{"dealt": the pieces
    of each new slot, "dealt_buffer": the buffered samples it was given, "first_pass": P + 1}``).
    """
    n_old = len(states)
    fresh = {"pass": 0, "shard": 0, "pos": 0, "buffer": []}
    norm = [st or fresh for st in states]
    last = max(int(st["pass"]) for st in norm)
    pieces: list[list[int]] = []
    buffers: list[list[list[int]]] = [[] for _ in range(n_new)]
    for slot, st in enumerate(norm):
        pieces += [[int(u), int(p)] for u, p in st.get("extra", [])]
        mine = slot_shards(n_urls, seed, int(st["pass"]), slot, n_old)
        shard = int(st["shard"])
        if shard < len(mine):
            pieces.append([mine[shard], int(st["pos"])])
            pieces += [[u, 0] for u in mine[shard + 1:]]
        for p in range(int(st["pass"]) + 1, last + 1):
            pieces += [[u, 0] for u in slot_shards(n_urls, seed, p, slot, n_old)]
        buffers[slot % n_new] += [[int(u), int(p)] for u, p in st["buffer"]]
    dealt: list[list[list[int]]] = [[] for _ in range(n_new)]
    load = [float(len(b)) for b in buffers]
    for piece in pieces:
        j = min(range(n_new), key=lambda k: (load[k], k))
        dealt[j].append(piece)
        load[j] += max(shard_size - piece[1], 0.0)
    out = []
    for j in range(n_new):
        out.append({"pass": last + 1, "shard": 0, "pos": 0, "buffer": [list(b) for b in buffers[j]],
                    "rng": _rng_state(random.Random(_seed(seed, last + 1, j, 0xD7A1))),
                    "extra": [list(piece) for piece in dealt[j]]})
    return out, {"dealt": dealt, "dealt_buffer": buffers, "first_pass": last + 1}


def urls_digest(urls: list[str]) -> str:
    return hashlib.sha256("\n".join(urls).encode()).hexdigest()[:16]
