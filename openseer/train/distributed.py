"""torchrun / SLURM environment and process-group set-up.

World size and rank come from the environment (torchrun's RANK/WORLD_SIZE/LOCAL_RANK, or SLURM's
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID with MASTER_ADDR/MASTER_PORT). One process without any of
these is world size 1, no process group needed. gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


class DistError(RuntimeError):
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


def init_distributed(backend: str = "auto", device: str = "cpu") -> DistEnv:
    """Initialise the default process group when the world has more than one process."""
    env = env_from_os()
    if env.world_size <= 1 or (dist.is_available() and dist.is_initialized()):
        if dist.is_available() and dist.is_initialized():
            return DistEnv(dist.get_rank(), dist.get_world_size(), env.local_rank)
        return env
    if backend == "auto":
        backend = "nccl" if device == "cuda" else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise DistError("dist.backend=nccl needs CUDA GPUs and none is visible here; use dist.backend=gloo on CPU")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if device == "cuda":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)
    return env


def all_reduce_scalar(value: float, op: str = "mean") -> float:
    """Reduce a Python number over ranks (identity for one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    if op == "mean":
        t /= dist.get_world_size()
    return float(t.item())


def gather_cat(t: torch.Tensor, dim: int) -> torch.Tensor:
    """All ranks' tensors concatenated along ``dim`` in rank order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=dim)
