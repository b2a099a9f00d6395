"""torchrun / SLURM environment and process-group set-up.

World size and rank come from the environment (torchrun's RANK/WORLD_SIZE/LOCAL_RANK, or SLURM's
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID with MASTER_ADDR/MASTER_PORT). One process without any of
these is world size 1, no process group needed. gloo on CPU; on GPU one process group with two
backends, ``cpu:gloo,cuda:nccl``: NCCL reduces the CUDA tensors (gradients, Sinkhorn sums, queue,
the per-step verdict) and gloo the few CPU ones (barriers, object broadcasts of run decisions and
the data-stream position, a checkpoint's success flag), so no collective can meet a tensor on a
device its group cannot reduce (docs/distributed.md, "Collectives and devices").

``check_dist`` validates a config against the world size BEFORE any process group exists, so a bad
set-up is one clear message on every rank instead of a hang in a collective.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import OpenseerError

ONE_RANK_GROUP_ENV = "OPENSEER_PROCESS_GROUP"


class DistError(OpenseerError, RuntimeError):
    """A distributed set-up that cannot work here, said before any collective can hang."""


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_os(environ=os.environ) -> DistEnv:
    """Read rank/world from torchrun's or SLURM's variables; defaults to a single process."""
    if "WORLD_SIZE" in environ and "RANK" in environ:
        return DistEnv(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0)))
    if "SLURM_NTASKS" in environ and "SLURM_PROCID" in environ and "MASTER_ADDR" in environ:
        return DistEnv(int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]),
                       int(environ.get("SLURM_LOCALID", 0)))
    return DistEnv()


def check_dist(cfg, env: DistEnv, device: str = "cpu") -> None:
    """Refuse a distributed set-up that cannot work, before any collective (same verdict on every rank)."""
    d, world = cfg.dist, env.world_size
    if d.backend == "nccl" and not torch.cuda.is_available():
        raise DistError("dist.backend=nccl needs CUDA GPUs and none is visible here; use dist.backend=gloo on CPU")
    n_gpus = torch.cuda.device_count() if device == "cuda" else 0
    if world > 1 and n_gpus > 1 and env.local_rank >= n_gpus:
        raise DistError(f"LOCAL_RANK {env.local_rank} but only {n_gpus} GPUs are visible on this node; "
                        f"start at most {n_gpus} processes per node (--nproc_per_node {n_gpus})")
    if cfg.data.batch_size % world:
        raise DistError(f"data.batch_size={cfg.data.batch_size} is the GLOBAL batch and must be divisible by the "
                        f"world size {world}; e.g. data.batch_size={max(1, cfg.data.batch_size // world) * world}")
    if cfg.swav.queue_length % world:
        raise DistError(f"swav.queue_length={cfg.swav.queue_length} must be divisible by the world size {world}")
    if d.fsdp_wrap not in ("stage", "block"):
        raise DistError(f"dist.fsdp_wrap must be 'stage' or 'block'; got {d.fsdp_wrap!r}")
    g = d.syncbn_group_size
    if g < 0:
        raise DistError(f"dist.syncbn_group_size must be >= 0 (0 = plain BatchNorm); got {g}")
    if g and world > 1 and (g > world or world % g):
        divisors = [k for k in range(1, world + 1) if world % k == 0]
        raise DistError(f"dist.syncbn_group_size={g} does not divide the world size {world} into equal groups; "
                        f"use one of {divisors} (or 0 for plain BatchNorm)")
    if world > 1 and d.strategy == "fsdp" and cfg.monitor.every and cfg.monitor.data:
        raise DistError("the kNN monitor runs the backbone on rank 0 only, which FSDP cannot (its shards are "
                        "gathered by all ranks together): set monitor.every=0 or use dist.strategy=ddp")
    if any(s < 1 for s in d.activation_checkpointing_stages):
        raise DistError(f"dist.activation_checkpointing_stages are 1-based stage numbers; "
                        f"got {d.activation_checkpointing_stages}")


def syncbn_group(group_size: int):
    """The process group this rank's SyncBN layers reduce over: consecutive ranks, ``group_size`` each.

    Every rank must call this (it creates all groups collectively). Returns None for the whole world.
    """
    world = dist.get_world_size()
    if group_size >= world:
        return None
    group, _ = dist.new_subgroups(group_size)
    return group


def cuda_index(env: DistEnv) -> int:
    """This process's GPU: its local rank, or 0 when the launcher shows each process one GPU (SLURM
    ``--gpus-per-task=1`` sets CUDA_VISIBLE_DEVICES per task)."""
    n = torch.cuda.device_count()
    return env.local_rank if n > 1 else 0


def process_group_backend(backend: str, device: str) -> str:
    """The backend string the default process group opens with: ``gloo`` on CPU; on CUDA
    ``cpu:gloo,cuda:nccl`` for ``auto`` and ``nccl`` (NCCL alone cannot reduce a CPU tensor)."""
    if backend == "auto":
        return "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"
    if backend == "nccl":
        return "cpu:gloo,cuda:nccl"
    return backend


def reduce_device(device: torch.device | str | None = None) -> torch.device:
    """Where a small tensor must live for the default group to reduce it: ``device`` if given and the
    group has a backend for its type; else the CPU when the group has gloo (or MPI), else this
    process's current GPU (a group opened by someone else with NCCL only)."""
    backend = str(dist.get_backend()) if dist.is_available() and dist.is_initialized() else "gloo"
    has_cpu = any(b in backend for b in ("gloo", "mpi"))
    if device is not None:
        device = torch.device(device)
        if device.type == "cpu" and has_cpu or device.type == "cuda" and ("nccl" in backend or "cuda" in backend):
            return device
    if has_cpu:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def init_distributed(backend: str = "auto", device: str = "cpu") -> DistEnv:
    """Initialise the default process group when the world has more than one process
    (``process_group_backend`` says with which backends)."""
    env = env_from_os()
    # OPENSEER_PROCESS_GROUP=1 under a launcher opens a group for one rank too: the collectives of
    # many ranks, checked on one GPU (bench/gpu_step.sh)
    one_rank_group = os.environ.get(ONE_RANK_GROUP_ENV) == "1" and "WORLD_SIZE" in os.environ
    if (env.world_size <= 1 and not one_rank_group) or (dist.is_available() and dist.is_initialized()):
        if dist.is_available() and dist.is_initialized():
            return DistEnv(dist.get_rank(), dist.get_world_size(), env.local_rank)
        return env
    if backend == "nccl" and not torch.cuda.is_available():
        raise DistError("dist.backend=nccl needs CUDA GPUs and none is visible here; use dist.backend=gloo on CPU")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if device == "cuda":
        torch.cuda.set_device(cuda_index(env))
    dist.init_process_group(backend=process_group_backend(backend, device), rank=env.rank,
                            world_size=env.world_size)
    return env


def close_distributed() -> None:
    """Destroy every process group, after all ranks are done with them. Gloo's worker threads must be
    joined before the interpreter shuts down, or a rank can die of SIGABRT ("terminate called without
    an active exception") after a run that ended well."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def on_main(env: DistEnv, fn, *args):
    """Run ``fn(*args)`` on rank 0 only and give every rank its result, or raise its error on every
    rank (as ``DistError`` on the others), so file-system decisions cannot race between ranks."""
    if env.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return fn(*args)
    box: list = [None, None]
    error = None
    dist.barrier()  # every rank is done with what came before (e.g. reading the directory) first
    if env.is_main:
        try:
            box[0] = fn(*args)
        except Exception as e:  # re-raised below, on every rank
            error = e
            box[1] = str(e)
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[1] is not None:
        raise DistError(box[1])
    return box[0]


def _multi() -> bool:
    """A process group is open (of any size: a 1-rank group runs the same collectives as many)."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_scalar(value: float, op: str = "mean") -> float:
    """Reduce a Python number over ranks (identity for one process), on a device the group reduces."""
    if not _multi():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=reduce_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    if op == "mean":
        t /= dist.get_world_size()
    return float(t.item())


def any_across_ranks(*flags: bool) -> list[bool]:
    """For each flag: is it set on any rank? One all-reduce for all of them."""
    if not _multi():
        return [bool(f) for f in flags]
    t = torch.tensor([float(bool(f)) for f in flags], dtype=torch.float64, device=reduce_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


def step_verdict(bad: torch.Tensor | bool, stop: bool, spent_s: float,
                 device: torch.device | str = "cpu") -> tuple[bool, bool, float]:
    """The per-step agreement of all ranks in ONE all-reduce (MAX) and one wait for the device:
    a bad (non-finite) step on any rank, a stop signal on any rank, and the slowest rank's clock
    (the time budget). ``bad`` may be a 0-d device tensor (it is never read on its own); the vector
    is built on ``device`` when the group can reduce it there."""
    dev = reduce_device(device) if _multi() else torch.device(device)
    head = torch.as_tensor(bad, device=dev).reshape(1).to(torch.float64)
    t = torch.cat([head, torch.tensor([float(stop), float(spent_s)], dtype=torch.float64).to(dev, non_blocking=True)])
    if _multi():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    b, s, spent = t.tolist()
    return b > 0, s > 0, spent


def gather_cat(t: torch.Tensor, dim: int) -> torch.Tensor:
    """All ranks' tensors concatenated along ``dim`` in rank order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=dim)
