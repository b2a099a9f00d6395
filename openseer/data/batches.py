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

Tar shards are streams, not indexable: their batches come from data/stream_batches.py and their
position (per loader slot) is saved in the checkpoint through ``data_state``/``prepare_stream``.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import Config
from ..fileio import name_to_text
from .collection import Collection
from .decode import BadImage, DataError, reduced_decode_pixels
from .multicrop import BatchMultiCrop, FastMultiCrop, MultiCrop


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
        else:
            raise DataError(f"{MAX_BAD_IN_A_ROW} unreadable images in a row near {self.source.batch_key(idx)}; "
                            f"is this really a folder of images?")
        if self.min_pixels:
            gen = torch.Generator().manual_seed(seed_of(self.seed, step, idx, 0xFA57))
            return self.multicrop(image, gen), self.source.batch_key(j), bad
        torch.manual_seed(seed_of(self.seed, step, idx))  # per-image augmentation stream
        return self.multicrop(image), self.source.batch_key(j), bad


def _collate(items):
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

    For streaming sources (tar shards) the result is a ``StreamBatches`` (data/stream_batches.py):
    iterate it like the others; its ``state_dict()``/``load_state_dict()`` carry the stream
    position through checkpoints (see ``prepare_stream`` and ``data_state`` below).
    """
    gb = cfg.data.batch_size
    if gb % world:
        raise DataError(f"data.batch_size={gb} (global) is not divisible by the world size {world}")
    n = len(source)
    steps_per_epoch(n, gb)
    if source.streaming:
        from .stream_batches import StreamBatches  # it builds on Batch, defined here

        return StreamBatches(source, cfg, rank, world, start_step, total_steps)
    return _indexed_batches(source, cfg, rank, world, start_step, total_steps)


def _indexed_batches(source: Collection, cfg: Config, rank: int, world: int, start_step: int,
                     total_steps: int) -> Iterator[Batch]:
    gb = cfg.data.batch_size
    n = len(source)
    if source.in_memory and cfg.data.batched_aug:
        aug = BatchMultiCrop(cfg.crops)
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
        dataset = _DecodedCrops(source, FastMultiCrop(cfg.crops), cfg.seed, decode_pixels(cfg))
    else:
        dataset = _DecodedCrops(source, MultiCrop(cfg.crops), cfg.seed)
    loader = DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers,
        collate_fn=_collate, persistent_workers=False, prefetch_factor=4 if workers else None,
        pin_memory=torch.cuda.is_available(),
    )
    for step, (crops, keys, bad) in enumerate(loader, start=start_step):
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
