"""From a source to batches of crops, one per training step, reproducibly.

The order is a pure function of (seed, step): epoch e uses a seeded permutation of the source, step
s takes the next global batch of it, and rank r takes its slice. Augmentation randomness is also
seeded per (seed, step, rank) for in-memory batches and per (seed, step, image) for decoded files.
So the data position is just the step number: a resumed run continues with exactly the batches
(and crops) the uninterrupted run would have seen, whatever the number of loader workers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import Config
from .decode import BadImage
from .multicrop import BatchMultiCrop, MultiCrop
from .sources import DataError, ImageSource

MAX_BAD_IN_A_ROW = 64


def seed_of(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


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


@dataclass
class Batch:
    step: int
    crops: list[torch.Tensor]
    keys: list[str]
    bad: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) of files skipped


class _DecodedCrops(Dataset):
    """Decodes one file and makes its crops; a bad file is replaced by the next good one, and counted."""

    def __init__(self, source: ImageSource, multicrop: MultiCrop, seed: int):
        self.source, self.multicrop, self.seed = source, multicrop, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int]):
        step, idx = item
        bad = []
        n = len(self.source)
        for attempt in range(MAX_BAD_IN_A_ROW):
            j = (idx + attempt) % n
            try:
                sample = self.source.load(j)
                break
            except BadImage as e:
                bad.append((self.source.key(j), e.reason))
        else:
            raise DataError(f"{MAX_BAD_IN_A_ROW} unreadable images in a row near {self.source.key(idx)}; "
                            f"is this really a folder of images?")
        torch.manual_seed(seed_of(self.seed, step, idx))  # per-image augmentation stream
        return self.multicrop(sample.image), sample.key, bad


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


def iterate_batches(source: ImageSource, cfg: Config, rank: int, world: int, start_step: int,
                    total_steps: int) -> Iterator[Batch]:
    """Batches for steps ``start_step .. total_steps - 1`` on this rank."""
    gb = cfg.data.batch_size
    if gb % world:
        raise DataError(f"data.batch_size={gb} (global) is not divisible by the world size {world}")
    n = len(source)
    steps_per_epoch(n, gb)
    if source.in_memory and cfg.data.batched_aug:
        aug = BatchMultiCrop(cfg.crops)
        images = source.images  # type: ignore[attr-defined]
        cache: dict = {}
        for step in range(start_step, total_steps):
            idx = step_indices(step, n, gb, rank, world, cfg.seed, _cache=cache)
            gen = torch.Generator().manual_seed(seed_of(cfg.seed, step, rank, 0xC0))
            crops = aug(images[idx], gen)
            yield Batch(step, crops, [source.key(i) for i in idx])
        return
    sampler = _StepSampler(n, gb, rank, world, cfg.seed, start_step, total_steps)
    workers = cfg.data.num_workers
    loader = DataLoader(
        _DecodedCrops(source, MultiCrop(cfg.crops), cfg.seed), batch_sampler=sampler, num_workers=workers,
        collate_fn=_collate, persistent_workers=False, prefetch_factor=4 if workers else None,
        pin_memory=torch.cuda.is_available(),
    )
    for step, (crops, keys, bad) in enumerate(loader, start=start_step):
        yield Batch(step, crops, keys, bad)


def count_reasons(bad: list[tuple[str, str]]) -> dict[str, int]:
    return dict(Counter(reason for _, reason in bad))
