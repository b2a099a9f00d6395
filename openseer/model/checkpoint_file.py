"""Reading checkpoint files: find a run's checkpoints, load one safely, take its backbone's tensors.

Below both the loaders (``model/load.py``, ``export.py``) and training (``train/checkpoint.py``,
which writes checkpoints and re-exports these names), so reading weights never reaches up into
the training package. Loading uses ``torch.load(weights_only=True)``: a file that would run code
when unpickled is refused. A sharded ``.dcp`` directory (FSDP, DCP) is read in one process.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch

from ..config import OpenseerError

# the names and listing of a run's checkpoints belong to the run directory (openseer/rundir.py)
from ..rundir import CKPT_DIR, META, checkpoint_path, list_checkpoints  # noqa: F401

PREFIX = "backbone."  # the backbone's tensors inside a SwAV model's state dict


class CheckpointError(OpenseerError, RuntimeError):
    """A checkpoint that is missing, unreadable, unsafe or does not fit the run."""


def sharded_keys(path: str | Path) -> set[str]:
    """Names of the tensors in a ``.dcp`` checkpoint (from DCP's metadata, no tensor is read)."""
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)



def _read_sharded(path: Path, shallow: bool) -> dict:
    try:
        state = torch.load(path / META, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refused to load {path / META}: it contains objects that would run code when "
                              f"unpickled. Detail: {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dict of training state")
    state["dcp"] = str(path)
    if shallow:
        return state
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "loading in a single process": that is the intent here
            flat = _load_state_dict_from_keys(checkpoint_id=str(path))
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated: {e}") from None
    state["model"] = {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}
    state["optimizer"] = {
        "state": {k[len("momentum."):]: {"momentum_buffer": v} for k, v in flat.items() if k.startswith("momentum.")},
        "param_groups": state.get("optimizer_groups", []),
    }
    return state



def load_checkpoint(path: str | Path, shallow: bool = False) -> dict:
    """Load a checkpoint on CPU with ``weights_only=True``; clear errors for bad or unsafe files.

    A sharded ``.dcp`` directory is consolidated (one process; optimizer state keyed by parameter
    name), or with ``shallow=True`` only its ``meta.pt`` is read and ``state['dcp']`` names it.
    """
    path = Path(path)
    if path.suffix == ".dcp" and path.is_dir():
        return _read_sharded(path, shallow)
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



def latest_checkpoint(run_dir: str | Path, shallow: bool = False) -> tuple[Path, dict]:
    """The newest checkpoint of a run that loads; a corrupt newest one falls back to the one before."""
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"{run_dir} has no checkpoint to resume from (looked in {Path(run_dir) / CKPT_DIR})")
    errors = []
    for path in reversed(found):
        try:
            return path, load_checkpoint(path, shallow=shallow)
        except CheckpointError as e:
            errors.append(str(e))
    raise CheckpointError("no checkpoint of the run could be loaded:\n  " + "\n  ".join(errors))


def backbone_tensors(path: Path, state: dict) -> dict[str, torch.Tensor]:
    """The backbone's tensors (prefix stripped) from a loaded checkpoint, plain or sharded."""
    if "dcp" in state:  # sharded: read only the backbone's tensors
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        keys = {k for k in sharded_keys(path) if k.startswith("model." + PREFIX)}
        flat = _load_state_dict_from_keys(keys, checkpoint_id=str(path))
        model = {k[len("model."):]: v for k, v in flat.items()}
    else:
        model = state["model"]
    out = {k[len(PREFIX):]: v.detach().cpu().contiguous() for k, v in model.items() if k.startswith(PREFIX)}
    if not out:
        raise CheckpointError(f"{path} holds no backbone tensors (keys starting with {PREFIX!r})")
    return out
