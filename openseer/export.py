"""Export a run's backbone as one flat safetensors file with timm key names.

``export_backbone(run_dir_or_checkpoint, out_path)`` takes the latest checkpoint of a run (a whole
``.pt`` or a sharded ``.dcp`` from FSDP, consolidated here in one process), keeps the ``backbone.``
tensors, strips that prefix and writes them with metadata (architecture, crop size, mean/std, step,
the training config), so ``timm.create_model(arch, num_classes=0).load_state_dict(load_file(path))``
works as is, and ``openseer eval`` reads the file directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import config_from_dict
from .train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, sharded_keys

PREFIX = "backbone."


def _backbone_tensors(path: Path, state: dict) -> dict[str, torch.Tensor]:
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


def export_backbone(source: str | Path, out_path: str | Path) -> Path:
    """Write the backbone of ``source`` (a run directory or one checkpoint) to ``out_path`` (.safetensors)."""
    import warnings

    from safetensors.torch import save_file

    source, out_path = Path(source), Path(out_path)
    if out_path.suffix != ".safetensors":
        raise CheckpointError(f"export writes a .safetensors file; got {out_path}")
    if source.is_dir() and source.suffix != ".dcp":
        path, state = latest_checkpoint(source, shallow=True)
    else:
        path, state = source, load_checkpoint(source, shallow=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        tensors = _backbone_tensors(path, state)
    meta = {"format": "openseer.backbone.v1", "source": str(path), "step": str(state.get("step", ""))}
    if isinstance(state.get("config"), dict):
        cfg = config_from_dict(state["config"])
        meta.update(arch=cfg.model.arch, crop_size=str(cfg.crops.sizes[0]), mean=json.dumps(list(cfg.crops.mean)),
                    std=json.dumps(list(cfg.crops.std)), config=json.dumps(state["config"]))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(out_path)
    return out_path
