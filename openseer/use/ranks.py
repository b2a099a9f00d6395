"""Rank-chunked jobs: one job's chunks split over the processes torchrun (or SLURM) starts.

``openseer embed`` (and so ``predict``, ``curate``, ``select`` and ``finetune --pile``, which embed
through it) runs as one process or as many: ``torchrun --nproc_per_node N -m openseer embed ...``
(several machines: ``--nnodes``, ``--node_rank``, ``--master_addr``; docs/guide.md). Every rank lists
the same collection; rank 0 prepares the output folder and says which chunks are already done; the
chunks left are dealt round-robin (the k-th chunk to do goes to rank k mod N); each rank writes its
own chunks' results; rank 0 waits for every rank and finishes the job alone. A chunk is done when its
part files exist, whoever wrote it, so a crashed rank's chunks are simply redone by the next run, on
any number of ranks.

The waits between ranks use their own gloo group with a long timeout (``WAIT``): the default group's
30 minutes is shorter than one slow rank's last chunk can take. A rank that fails ends its process and
torchrun stops the others; nothing waits forever.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..train.distributed import (
    DistEnv,
    DistError,
    close_distributed,
    cuda_index,
    env_from_os,
    init_distributed,
)

WAIT = timedelta(days=7)
T = TypeVar("T")
_GROUP: dict[str, Any] = {}  # the long-timeout gloo group of the open default group


class RankZeroError(DistError):
    """Rank 0's error, as the other ranks see it (rank 0 says it; ``rank_session`` keeps them quiet)."""


@dataclass
class Ranks:
    """This process's place in a rank-chunked job; a single process is rank 0 of 1."""

    env: DistEnv
    group: Any = None  # a gloo group over all ranks (None: one process)

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def mine(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items``: the k-th goes to rank k mod world."""
        return list(items[self.rank::self.world])

    def on_main(self, fn, *args):
        """``fn(*args)`` on rank 0 only; every rank gets its result, or its error (raised on every rank
        alike, so all of them stop the same way)."""
        if self.group is None:
            return fn(*args)
        box: list = [None, None]
        error = None
        dist.barrier(group=self.group)  # every rank is done with what came before
        if self.is_main:
            try:
                box[0] = fn(*args)
            except Exception as e:  # re-raised below, on every rank
                error = e
                box[1] = f"{type(e).__name__}: {e}"
        dist.broadcast_object_list(box, src=0, group=self.group)
        if error is not None:
            raise error
        if box[1] is not None:
            raise RankZeroError(box[1])
        return box[0]

    def gather(self, value: Any) -> list:
        """Every rank's ``value``, in rank order, on every rank (waits for the slowest)."""
        if self.group is None:
            return [value]
        out: list = [None] * self.world
        dist.all_gather_object(out, value, group=self.group)
        return out


def open_ranks(device: str | torch.device = "cpu") -> Ranks:
    """This process's ``Ranks``: under torchrun (or SLURM) the process group is opened (gloo on CPU;
    on GPUs each rank takes the GPU of its local rank), else one process and no group. Call it before
    a model goes to a GPU. Calling it again reuses the open group."""
    env = env_from_os()
    opened = dist.is_available() and dist.is_initialized()
    if env.world_size <= 1 and not opened:
        return Ranks(env)
    kind = torch.device(device).type
    env = init_distributed("auto", kind)  # a no-op when the group is open; set_device on GPUs
    if env.world_size <= 1:
        return Ranks(env)
    world_group = dist.group.WORLD
    if _GROUP.get("world") is not world_group:
        _GROUP.update(world=world_group, group=dist.new_group(backend="gloo", timeout=WAIT))
    return Ranks(env, _GROUP["group"])


def rank_device(device: str | torch.device, ranks: Ranks) -> torch.device:
    """Where this rank computes: its own GPU under torchrun, else ``device`` as given."""
    device = torch.device(device)
    if device.type == "cuda" and ranks.world > 1:
        return torch.device("cuda", cuda_index(ranks.env))
    return device


@contextlib.contextmanager
def rank_session(device: str | torch.device = "cpu") -> Iterator[Ranks]:
    """The ranks of one command: opened before it, closed after it. On success every rank waits for
    the others and the group is closed (gloo's threads joined, so no rank dies of SIGABRT at exit); on
    an error the group is dropped without waiting, the process ends and torchrun stops the rest; an
    error of rank 0's that every rank got (``on_main``) is printed by rank 0 alone, and every rank
    exits with 2."""
    ranks = open_ranks(device)
    try:
        yield ranks
    except BaseException as e:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        _GROUP.clear()
        if isinstance(e, RankZeroError) and not ranks.is_main:
            raise SystemExit(2) from e  # rank 0 prints the message once, every rank exits 2
        raise
    if ranks.group is not None:
        dist.barrier(group=ranks.group)  # rank 0's last work (packing, predictions) may take long
    close_distributed()
    _GROUP.clear()


__all__ = ["WAIT", "RankZeroError", "Ranks", "open_ranks", "rank_device", "rank_session"]
