"""Checkpoints: atomic writes, rotation, safe loading.

A checkpoint is written to a temporary file, fsynced, then renamed over its final name, so a crash
at any moment leaves either the previous checkpoint or the new one as the latest, never half a file.
Old checkpoints are removed only after the new one is safely on disk. Loading uses
``torch.load(weights_only=True)``: a file that would run code when unpickled is refused.

FSDP runs write sharded checkpoints with ``torch.distributed.checkpoint`` (DCP): a directory
``step_XXXXXXXX.dcp`` holding each rank's shards, DCP's ``.metadata`` and ``meta.pt`` (step, config,
schedule, counters, RNG, queue, optimiser groups). It is written as ``*.dcp.tmp`` and renamed when
complete, so the same crash rules hold. DCP reshards on load: a run saved on N processes resumes on
M. ``load_checkpoint`` of a ``.dcp`` directory in one process returns the same dict as a ``.pt``
file (``model``, ``optimizer`` keyed by parameter name, ...); ``shallow=True`` skips the tensors.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path

import torch

# reading lives below the model layer (model/checkpoint_file.py), the names and listing in the run
# directory's owner (openseer/rundir.py); re-exported here for training
from ..model.checkpoint_file import CheckpointError, latest_checkpoint, load_checkpoint, sharded_keys  # noqa: F401
from ..rundir import CKPT_DIR, META, checkpoint_path, list_checkpoints  # noqa: F401
from .distributed import reduce_device


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(state: dict, run_dir: str | Path, step: int, keep: int) -> Path:
    """Write ``state`` atomically as ``checkpoints/step_XXXXXXXX.pt`` and keep the newest ``keep``."""
    final = checkpoint_path(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            pause = os.environ.get("OPENSEER_FAULT_PAUSE_IN_CHECKPOINT")  # fault injection (tests only)
            if pause:
                time.sleep(float(pause))
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except (OSError, RuntimeError) as e:  # torch.save wraps a full disk in a RuntimeError
        cause = e if isinstance(e, OSError) else (e.__context__ if isinstance(e.__context__, OSError) else e)
        reason = getattr(cause, "strerror", None) or str(cause).splitlines()[0]
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        previous = [p for p in list_checkpoints(run_dir) if p != final]
        kept = f"; the previous checkpoint {previous[-1]} is intact" if previous else ""
        raise CheckpointError(f"could not write checkpoint {final}: {reason}{kept}") from None
    for old in list_checkpoints(run_dir)[:-keep]:
        _remove(old)
    return final


def save_sharded_checkpoint(meta: dict, tensors: dict, run_dir: str | Path, step: int, keep: int) -> Path:
    """Every rank: write ``tensors`` (flat name -> tensor/DTensor) with DCP plus ``meta`` (rank 0) as
    ``checkpoints/step_XXXXXXXX.dcp``; atomic rename and rotation on rank 0. Raises CheckpointError
    on every rank when any rank failed (so no rank waits for another)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    final = checkpoint_path(run_dir, step).with_suffix(".dcp")
    tmp = final.with_name(final.name + ".tmp")
    main = dist.get_rank() == 0
    error = ""
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    try:
        dcp.save(tensors, checkpoint_id=str(tmp))
    except Exception as e:  # DCP reports any rank's failure on every rank
        error = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if main and not error:
        try:
            with open(tmp / META, "wb") as f:
                torch.save(meta, f)
                f.flush()
                os.fsync(f.fileno())
            _remove(final)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except OSError as e:
            error = e.strerror or str(e)
    failed = torch.tensor([1.0 if error else 0.0], device=reduce_device())  # gloo: CPU; NCCL-only: GPU
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item():
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = [p for p in list_checkpoints(run_dir) if p != final]
        kept = f"; the previous checkpoint {previous[-1]} is intact" if previous else ""
        raise CheckpointError(f"could not write checkpoint {final}: {error or 'failed on another rank'}{kept}")
    if main:
        for old in list_checkpoints(run_dir)[:-keep]:
            _remove(old)
    return final


def load_sharded(path: str | Path, template: dict) -> None:
    """Fill ``template`` (name -> tensor or DTensor, shaped/sharded as this run wants) from a ``.dcp``
    checkpoint, in place, whatever world size wrote it. Every rank calls it."""
    import torch.distributed.checkpoint as dcp

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(template, checkpoint_id=str(path))
    except Exception as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"checkpoint {path} does not fit this model/config: "
                              f"{first[0] if first else type(e).__name__}") from None
