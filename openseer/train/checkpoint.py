"""Checkpoints: atomic writes, rotation, safe loading.

A checkpoint is written to a temporary file, fsynced, then renamed over its final name, so a crash
at any moment leaves either the previous checkpoint or the new one as the latest, never half a file.
Old checkpoints are removed only after the new one is safely on disk. Loading uses
``torch.load(weights_only=True)``: a file that would run code when unpickled is refused.
"""

from __future__ import annotations

import os
import pickle
import re
import time
from pathlib import Path

import torch

CKPT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{8,})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, unsafe or does not fit the run."""


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary files are never listed)."""
    folder = Path(run_dir) / CKPT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


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
        old.unlink(missing_ok=True)
    return final


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint on CPU with ``weights_only=True``; clear errors for bad or unsafe files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: it contains objects that would run code when unpickled "
            f"(only tensors and plain data are allowed). Detail: {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dict of training state")
    return state


def latest_checkpoint(run_dir: str | Path) -> tuple[Path, dict]:
    """The newest checkpoint of a run that loads; a corrupt newest one falls back to the one before."""
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"{run_dir} has no checkpoint to resume from (looked in {Path(run_dir) / CKPT_DIR})")
    errors = []
    for path in reversed(found):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            errors.append(str(e))
    raise CheckpointError("no checkpoint of the run could be loaded:\n  " + "\n  ".join(errors))
