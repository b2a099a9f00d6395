"""What both batch makers share: the ``Batch`` of one step, seeds, and the reduced decode size.

Indexed sources (data/batches.py) and tar shard streams (data/stream_batches.py) both build on this.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import Config
from .decode import reduced_decode_pixels


def seed_of(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


@dataclass
class Batch:
    step: int
    crops: list[torch.Tensor]
    keys: list[str]
    bad: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) of files skipped


def decode_pixels(cfg: Config) -> int:
    """Fewest pixels a reduced-size decode must keep for ``cfg.crops`` (see decode.py)."""
    return reduced_decode_pixels(cfg.crops.sizes, cfg.crops.min_scale)
