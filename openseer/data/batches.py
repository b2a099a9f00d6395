"""From a collection to batches of crops, one ``Batch`` per training step, reproducibly.

The order is a pure function of (seed, step): epoch e uses a seeded permutation of the collection,
step s takes the next global batch of it, and rank r takes its slice. Augmentation randomness is also
seeded per (seed, step, rank) for in-memory batches and per (seed, step, image) for decoded files.
So the data position is just the step number: a resumed run continues with exactly the batches
(and crops) the uninterrupted run would have seen, whatever the number of loader workers.

Which multi-crop path runs (data/multicrop.py): in-memory tensors -> ``BatchMultiCrop`` on the
whole batch (``data.batched_aug``, the default; else ``MultiCrop`` per image); decoded files ->
``FastMultiCrop`` on a reduced-size decode (``data.fast_decode``, the default; else a full decode
and ``MultiCrop``).

Tar shards are streams, not indexable (data/stream.py deals them to loader slots):
``iterate_batches`` returns a ``StreamBatches`` for a ``ShardCollection``, iterated like the others,
whose position (per loader slot) is saved in the checkpoint through ``data_state``/``prepare_stream``.
Step ``t`` of rank ``r`` is filled entirely from loader slot ``r * L + (t mod L)`` (``L`` slots per
rank, fixed at the run's first start), image by image until the per-rank batch holds
``batch_size / world`` good images; undecodable ones are skipped and reported in ``Batch.bad``,
deny-listed ones never leave the stream. ``data.num_workers`` processes share the ``L`` slots
(worker ``w`` serves the steps ``t`` with ``(t - start) mod workers == w``), so any worker count
that divides ``L`` gives the same batches; another count falls back to ``L`` workers (0: every slot
in the main process). Augmentation is seeded per (seed, step, rank, image position in the batch),
so a resumed run reproduces the uninterrupted run's crops bit for bit.
"""

from __future__ import annotations

import copy
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ..config import Config
from ..fileio import name_to_text
from .collection import Collection
from .decode import BadImage, DataError, decode_bytes, reduced_decode_pixels
from .denylist import record_provenance
from .multicrop import BatchMultiCrop, FastMultiCrop, MultiCrop
from .stream import SlotStream, redeal, urls_digest


def seed_of(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


@dataclass
class Batch:
    """The crops of one training step on one rank, the keys of its images, and the files skipped."""

    step: int
    crops: list[torch.Tensor]
    keys: list[str]
    bad: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) of files skipped


def decode_pixels(cfg: Config) -> int:
    """Fewest pixels a reduced-size decode must keep for ``cfg.crops`` (see decode.py)."""
    return reduced_decode_pixels(cfg.crops.sizes, cfg.crops.min_scale)


MAX_BAD_IN_A_ROW = 64


def steps_per_epoch(n_images: int, global_batch: int) -> int:
    if n_images < global_batch:
        raise DataError(f"the data has {n_images} images, fewer than one global batch "
                        f"(data.batch_size={global_batch}); lower data.batch_size or add images")
    return n_images // global_batch


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed_of(seed, epoch, 0x5EE5)))


def step_indices(step: int, n: int, global_batch: int, rank: int, world: int, seed: int,
                 _cache: dict | None = None) -> list[int]:
    """Indices of this rank's share of the global batch at ``step`` (last partial batch dropped)."""
    spe = steps_per_epoch(n, global_batch)
    epoch, within = divmod(step, spe)
    if _cache is not None and _cache.get("epoch") == epoch:
        perm = _cache["perm"]
    else:
        perm = epoch_permutation(n, seed, epoch)
        if _cache is not None:
            _cache.update(epoch=epoch, perm=perm)
    local = global_batch // world
    start = within * global_batch + rank * local
    return perm[start:start + local].tolist()


class _DecodedCrops(Dataset):
    """Decodes one file and makes its crops; a bad file is replaced by the next good one, and counted.

    With ``min_pixels`` (data.fast_decode) the file is decoded at a reduced size and cropped by
    ``FastMultiCrop`` with a generator seeded per (seed, step, image); otherwise full decode and the
    torchvision ``MultiCrop`` seeded through the global RNG (the original path).
    """

    def __init__(self, source: Collection, multicrop, seed: int, min_pixels: int | None = None):
        self.source, self.multicrop, self.seed, self.min_pixels = source, multicrop, seed, min_pixels

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int]):
        step, idx = item
        bad = []
        n = len(self.source)
        for attempt in range(MAX_BAD_IN_A_ROW):
            j = (idx + attempt) % n
            try:
                image = self.source.load(j, min_pixels=self.min_pixels)
                break
            except BadImage as e:
                bad.append((name_to_text(self.source.batch_key(j)), e.reason))  # one line of text in bad_images.txt
        else:  # returned, not raised: a loader worker would wrap the message in its traceback
            if n <= MAX_BAD_IN_A_ROW:  # every file was tried
                reasons = ", ".join(f"{r} {c}" for r, c in sorted(count_reasons(bad[:n]).items()))
                return _Unusable(f"no usable image in {self.source.spec}: all {n} files are unreadable ({reasons}); "
                                 f"e.g. {bad[0][0]} ({bad[0][1]})")
            return _Unusable(f"{MAX_BAD_IN_A_ROW} unreadable images in a row near {self.source.batch_key(idx)}; "
                             f"is this really a folder of images?")
        if self.min_pixels:
            gen = torch.Generator().manual_seed(seed_of(self.seed, step, idx, 0xFA57))
            return self.multicrop(image, gen), self.source.batch_key(j), bad
        torch.manual_seed(seed_of(self.seed, step, idx))  # per-image augmentation stream
        return self.multicrop(image), self.source.batch_key(j), bad


class _Unusable(str):
    """What a loader worker hands back instead of raising when it finds no usable image: the main
    process raises it as one ``DataError`` line (a raise in a worker arrives wrapped in its traceback)."""


def _collate(items):
    failed = next((it for it in items if isinstance(it, _Unusable)), None)
    if failed is not None:
        return failed
    crops = [torch.stack(c) for c in zip(*[it[0] for it in items])]
    keys = [it[1] for it in items]
    bad = [b for it in items for b in it[2]]
    return crops, keys, bad


class _StepSampler:
    def __init__(self, n, global_batch, rank, world, seed, start_step, total_steps):
        self.args = (n, global_batch, rank, world, seed)
        self.start_step, self.total_steps = start_step, total_steps

    def __iter__(self):
        cache: dict = {}
        for step in range(self.start_step, self.total_steps):
            yield [(step, i) for i in step_indices(step, *self.args, _cache=cache)]

    def __len__(self):
        return max(self.total_steps - self.start_step, 0)


def iterate_batches(source: Collection, cfg: Config, rank: int, world: int, start_step: int,
                    total_steps: int) -> Iterator[Batch]:
    """Batches for steps ``start_step .. total_steps - 1`` on this rank.

    For streaming sources (tar shards) the result is a ``StreamBatches`` (below):
    iterate it like the others; its ``state_dict()``/``load_state_dict()`` carry the stream
    position through checkpoints (see ``prepare_stream`` and ``data_state`` below).
    """
    gb = cfg.data.batch_size
    if gb % world:
        raise DataError(f"data.batch_size={gb} (global) is not divisible by the world size {world}")
    n = len(source)
    steps_per_epoch(n, gb)
    if source.streaming:
        return StreamBatches(source, cfg, rank, world, start_step, total_steps)
    return _indexed_batches(source, cfg, rank, world, start_step, total_steps)


def _indexed_batches(source: Collection, cfg: Config, rank: int, world: int, start_step: int,
                     total_steps: int) -> Iterator[Batch]:
    gb = cfg.data.batch_size
    n = len(source)
    if source.in_memory and cfg.data.batched_aug:
        aug = BatchMultiCrop(cfg.crops, cfg.model.in_chans)
        images = source.images  # type: ignore[attr-defined]
        cache: dict = {}
        for step in range(start_step, total_steps):
            idx = step_indices(step, n, gb, rank, world, cfg.seed, _cache=cache)
            gen = torch.Generator().manual_seed(seed_of(cfg.seed, step, rank, 0xC0))
            crops = aug(images[idx], gen)
            yield Batch(step, crops, [source.batch_key(i) for i in idx])
        return
    sampler = _StepSampler(n, gb, rank, world, cfg.seed, start_step, total_steps)
    workers = cfg.data.num_workers
    if cfg.data.fast_decode and not source.in_memory:
        dataset = _DecodedCrops(source, FastMultiCrop(cfg.crops, cfg.model.in_chans), cfg.seed, decode_pixels(cfg))
    else:
        dataset = _DecodedCrops(source, MultiCrop(cfg.crops, cfg.model.in_chans), cfg.seed)
    loader = DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers,
        collate_fn=_collate, persistent_workers=False, prefetch_factor=4 if workers else None,
        pin_memory=torch.cuda.is_available(),
    )
    for step, item in enumerate(loader, start=start_step):
        if isinstance(item, _Unusable):
            raise DataError(str(item))
        crops, keys, bad = item
        yield Batch(step, crops, keys, bad)


def count_reasons(bad: list[tuple[str, str]]) -> dict[str, int]:
    return dict(Counter(reason for _, reason in bad))


# ---------------------------------------------------------------- hooks for the training loop


def prepare_stream(batches: Iterator[Batch], run_dir: str | Path, resume_state: dict | None, is_main: bool) -> None:
    """Streaming sources only (a no-op otherwise): restore the stream position saved in a
    checkpoint (``resume_state['data']``) and record the run's data provenance
    (RUN_DIR/data_provenance.json: shards, manifest, deny-list version, layout)."""
    if not hasattr(batches, "load_state_dict"):
        return
    if resume_state is not None:
        batches.load_state_dict(resume_state.get("data"))
    if is_main and getattr(batches, "note", ""):
        print(f"openseer: {batches.note}", file=sys.stderr)
    if is_main:
        batches.record_provenance(run_dir)


def data_state(batches: Iterator[Batch]) -> dict | None:
    """The data position to store in a checkpoint (streaming sources; ``None`` otherwise).
    Collective under torch.distributed: every rank calls it at the same step."""
    return batches.state_dict() if hasattr(batches, "state_dict") else None


# ---------------------------------------------------------------- tar shards: a checkpointable stream


MAX_BAD_SAMPLES_IN_A_ROW = 1000  # consecutive undecodable shard samples before the stream is declared not images
STATE_FORMAT = "openseer.stream.v1"


class _SlotBatches(IterableDataset):
    """Yields (step, local slot, crops, keys, bad, slot state) for this worker's steps."""

    def __init__(self, source, cfg: Config, rank: int, world: int, layout: dict, states: list,
                 start: int, stop: int, workers: int):
        self.urls, self.deny, self.decoding = source.urls, source.deny, source.decoding
        self.cfg, self.rank, self.world, self.layout = cfg, rank, world, layout
        self.states, self.start, self.stop, self.workers = states, start, stop, max(workers, 1)
        self.per_rank = cfg.data.batch_size // world

    def __iter__(self):
        try:
            yield from self._batches()
        except DataError as e:  # handed to the main process as a clean message, not a worker traceback
            yield ("error", str(e))

    def _batches(self):
        info = get_worker_info()
        w = info.id if info is not None else 0
        n_workers = self.workers if info is not None else 1
        cfg, L = self.cfg, self.layout["slots_per_rank"]
        fast = cfg.data.fast_decode
        multicrop = (FastMultiCrop(cfg.crops, cfg.model.in_chans) if fast
                     else MultiCrop(cfg.crops, cfg.model.in_chans))
        min_pixels = decode_pixels(cfg) if fast else None
        streams: dict[int, SlotStream] = {}
        bad_in_a_row = 0
        for t in range(self.start + w, self.stop, n_workers):
            local = t % L
            stream = streams.get(local)
            if stream is None:
                stream = streams[local] = SlotStream(
                    self.urls, self.layout["seed"], self.rank * L + local, self.world * L,
                    self.layout["shuffle_buffer"], self.deny, state=self.states[local],
                    pipe_timeout=cfg.data.pipe_timeout)
            crops: list[list[torch.Tensor]] = []
            keys: list[str] = []
            bad = stream.take_reports()
            while len(keys) < self.per_rank:
                s = next(stream)
                try:
                    image = decode_bytes(s.data or b"", s.key, min_pixels=min_pixels, decoding=self.decoding)
                except BadImage as e:
                    bad.append((s.key, e.reason))
                    bad_in_a_row += 1
                    if bad_in_a_row >= MAX_BAD_SAMPLES_IN_A_ROW:
                        raise DataError(f"{MAX_BAD_SAMPLES_IN_A_ROW} undecodable samples in a row in the shards "
                                        f"(last: {s.key} in {self.urls[s.url_index]}); are these image shards?") from None
                    continue
                bad_in_a_row = 0
                seed = seed_of(cfg.seed, t, self.rank, len(keys), 0x5EED)
                if fast:
                    crops.append(multicrop(image, torch.Generator().manual_seed(seed)))
                else:
                    torch.manual_seed(seed)
                    crops.append(multicrop(image))
                keys.append(s.key)
            bad += stream.take_reports()
            stacked = [torch.stack(group) for group in zip(*crops)]
            yield t, local, stacked, keys, bad, stream.state()


def loader_slots(n_shards: int, world: int, num_workers: int) -> int:
    """Loader slots per rank for ``n_shards`` tar shards: ``data.num_workers`` (at least 1), fewer when
    the shards cannot feed that many (every slot needs a shard per pass), never fewer than 1."""
    return max(1, min(max(num_workers, 1), n_shards // max(world, 1)))


class StreamBatches:
    """Iterable of ``Batch`` for steps ``start .. stop - 1`` of one rank, over tar shards."""

    def __init__(self, source: Collection, cfg: Config, rank: int, world: int, start: int, stop: int):
        self.source, self.cfg, self.rank, self.world = source, cfg, rank, world
        self.start, self.stop = start, stop
        urls = source.urls  # type: ignore[attr-defined]
        self.layout = {
            "n_urls": len(urls), "urls_digest": urls_digest(urls), "seed": cfg.seed, "world_size": world,
            "slots_per_rank": loader_slots(len(urls), world, cfg.data.num_workers),
            "shuffle_buffer": cfg.data.shuffle_buffer, "epoch_samples": len(source),
        }
        self._check_slots()
        self.slot_states: list[dict | None] = [None] * self.layout["slots_per_rank"]
        self.note = ""
        if self.layout["slots_per_rank"] < max(cfg.data.num_workers, 1):  # said once, by the loop, on rank 0
            self.note = (f"{len(urls)} shard(s) for {world} rank(s): {self.layout['slots_per_rank']} loader slot(s) "
                         f"per rank instead of data.num_workers={cfg.data.num_workers} (every slot needs a shard)")
        self._history: dict | None = None  # the stream state before the world size last changed
        self._gen: Iterator[Batch] | None = None

    def _check_slots(self) -> None:
        n_slots = self.world * self.layout["slots_per_rank"]
        if self.layout["n_urls"] < n_slots:
            raise DataError(
                f"{self.layout['n_urls']} shard(s) cannot feed {self.world} rank(s) x "
                f"{self.layout['slots_per_rank']} loader slot(s): every slot needs at least one shard per pass. "
                f"Write more, smaller shards (openseer shard --shard-size) or run on fewer processes")

    # -- checkpoint hooks --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Stream positions of every rank's slots after the last batch handed out (collective)."""
        import torch.distributed as dist

        local = copy.deepcopy(self.slot_states)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, local)
        else:  # one process (or ranks driven by hand): only this rank's slots are known here
            gathered = [None] * self.world
            gathered[self.rank] = local
        out = {"format": STATE_FORMAT, "layout": dict(self.layout), "ranks": gathered}
        if self._history is not None:
            out["before"] = self._history
        return out

    def load_state_dict(self, state: dict | None) -> None:
        """Continue from a checkpoint's stream positions (call before iterating)."""
        if not state:
            raise DataError("the checkpoint has no stream position (it was not written by a run reading tar "
                            "shards, or by an older openseer); cannot resume this shard stream exactly")
        if state.get("format") != STATE_FORMAT:
            raise DataError(f"unknown stream state format {state.get('format')!r}")
        saved = state["layout"]
        if saved["urls_digest"] != self.layout["urls_digest"] or saved["n_urls"] != self.layout["n_urls"]:
            raise DataError("the shard list differs from the one this run started with "
                            f"({saved['n_urls']} vs {self.layout['n_urls']} shards); resume with the same --data")
        notes = []
        if saved["slots_per_rank"] != self.layout["slots_per_rank"]:
            notes.append(f"stream layout keeps {saved['slots_per_rank']} loader slot(s) per rank from the run's "
                         f"start (data.num_workers={self.cfg.data.num_workers} now)")
        if saved["world_size"] != self.world:
            state = self._redeal(state)
            notes.append(f"the world size changed from {saved['world_size']} to {self.world}: the shards left of "
                         f"the passes begun were re-dealt to the new ranks; pass {state['layout']['first_pass']} "
                         "starts on the new layout")
        self.note = "; ".join(notes)
        mine = state["ranks"][self.rank]
        if mine is None:
            raise DataError(f"the stream state has no position for rank {self.rank}")
        self.layout = dict(state["layout"])
        self._check_slots()
        self.slot_states = list(mine)
        self._history = state.get("before")

    def _redeal(self, state: dict) -> dict:
        """The stream state of ``state``'s run continued on this world size (see ``stream.redeal``);
        the old state is kept under ``before`` so a takedown check can still tell what it had read."""
        missing = [r for r, slots in enumerate(state["ranks"]) if slots is None]
        if missing:
            raise DataError(f"the checkpoint lacks the stream positions of rank(s) {missing} (written by ranks driven "
                            "without torch.distributed); it can only be resumed on the same number of processes")
        layout = state["layout"]
        L = layout["slots_per_rank"]
        old = [st for slots in state["ranks"] for st in slots]
        new, dealt = redeal(old, layout["n_urls"], layout["seed"], self.world * L,
                            shard_size=layout["epoch_samples"] / max(layout["n_urls"], 1))
        new_layout = {**layout, "world_size": self.world, **dealt}
        return {"format": STATE_FORMAT, "layout": new_layout,
                "ranks": [new[r * L:(r + 1) * L] for r in range(self.world)], "before": state}

    def record_provenance(self, run_dir) -> None:
        layout = {k: v for k, v in self.layout.items() if k not in ("dealt", "dealt_buffer")}  # those: checkpoint only
        info = {**self.source.provenance(), "layout": layout}
        record_provenance(run_dir, info, self.start, self.source.deny)

    # -- iteration ---------------------------------------------------------------------------
    def _workers(self) -> int:
        L, nw = self.layout["slots_per_rank"], self.cfg.data.num_workers
        if nw == 0:
            return 0
        return nw if L % nw == 0 else L

    def __iter__(self) -> Iterator[Batch]:
        """One pass over the steps (iterating again continues the same pass, like a generator)."""
        if self._gen is None:
            workers = self._workers()
            dataset = _SlotBatches(self.source, self.cfg, self.rank, self.world, self.layout,
                                   copy.deepcopy(self.slot_states), self.start, self.stop, workers)
            # the generator holds the slot states, not self: dropping this object frees it at once (no
            # reference cycle), so its loader workers stop then, not at some later garbage collection
            self._gen = _in_step_order(dataset, workers, self.start, self.stop, self.slot_states)
        return self._gen

    def __next__(self) -> Batch:
        return next(iter(self))

    def close(self) -> None:
        """Stop the pass: its loader workers shut down now."""
        if self._gen is not None:
            self._gen.close()


def _in_step_order(dataset: _SlotBatches, workers: int, start: int, stop: int,
                   slot_states: list[dict | None]) -> Iterator[Batch]:
    """The loader's batches in step order; each handed-out batch's slot position goes into ``slot_states``."""
    if start >= stop:
        return
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None,
                        persistent_workers=False, pin_memory=torch.cuda.is_available())
    pending: dict[int, tuple] = {}
    expected = start
    for item in loader:
        if item[0] == "error":
            raise DataError(item[1])
        pending[item[0]] = item
        while expected in pending:
            t, local, crops, keys, bad, state = pending.pop(expected)
            slot_states[local] = state
            expected += 1
            yield Batch(t, crops, keys, bad)
