"""Training state <-> named tensors for sharded (DCP) checkpoints, across world sizes and strategies.

A sharded checkpoint names every tensor: ``model.<state-dict key>`` and ``momentum.<parameter name>``
(SGD's momentum buffer; absent for parameters that never had a gradient, e.g. still-frozen
prototypes). Names do not depend on the world size, so DCP can reshard on load. The loop's training
state dict (``model``/``optimizer``/...) is split into those tensors and ``meta.pt``.

``restore_state`` loads either kind of checkpoint into either kind of model: a ``.dcp`` checkpoint
into shards (FSDP) or whole tensors (one process, DDP), and a whole-tensor ``.pt`` checkpoint into
FSDP shards (a run started on one process continues under FSDP on several).
"""

from __future__ import annotations

import torch
from torch import nn

from .checkpoint import CheckpointError, load_sharded, save_sharded_checkpoint, sharded_keys

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = ()  # type: ignore[assignment,misc]
    distribute_tensor = None  # type: ignore[assignment]


def _param_order(optimizer) -> list[nn.Parameter]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _names(net: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in net.named_parameters()}


def split_state(state: dict, net: nn.Module, optimizer) -> tuple[dict, dict]:
    """(meta, tensors) of the loop's training state: tensors by name, everything else in meta."""
    names = _names(net)
    order = _param_order(optimizer)
    opt = state["optimizer"]
    tensors = {f"model.{k}": v for k, v in state["model"].items()}
    for idx, s in opt["state"].items():
        buf = s.get("momentum_buffer")
        if buf is not None:
            tensors[f"momentum.{names[id(order[idx])]}"] = buf
    meta = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
    meta["optimizer_groups"] = opt["param_groups"]
    return meta, tensors


def save_sharded(state: dict, net: nn.Module, optimizer, run_dir, step: int, keep: int):
    """Every rank: write the loop's training state as ``checkpoints/step_XXXXXXXX.dcp``."""
    meta, tensors = split_state(state, net, optimizer)
    return save_sharded_checkpoint(meta, tensors, run_dir, step, keep)


def _like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``full`` shaped as ``target``: sharded the same way when ``target`` is a DTensor (collective)."""
    if tuple(full.shape) != tuple(target.shape):
        raise CheckpointError(f"a checkpoint tensor has shape {tuple(full.shape)}, the model {tuple(target.shape)}")
    if isinstance(target, DTensor):
        return distribute_tensor(full.to(device=target.device, dtype=target.dtype), target.device_mesh,
                                 target.placements)
    return full


def restore_state(state: dict, net: nn.Module, optimizer, path) -> None:
    """Load model weights/buffers and SGD momentum from ``state`` (shallow ``.dcp`` or whole ``.pt``)."""
    names = _names(net)
    order = _param_order(optimizer)
    own = net.state_dict()
    if "dcp" in state:
        keys = sharded_keys(state["dcp"])
        missing = [k for k in own if f"model.{k}" not in keys]
        unexpected = [k for k in keys if k.startswith("model.") and k[len("model."):] not in own]
        if missing or unexpected:
            what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
            raise CheckpointError(f"checkpoint {path} does not fit this model/config: {what}")
        template = {f"model.{k}": v for k, v in own.items()}
        wanted = {i: f"momentum.{names[id(p)]}" for i, p in enumerate(order)
                  if f"momentum.{names[id(p)]}" in keys}
        template.update({key: torch.zeros_like(order[i]) for i, key in wanted.items()})
        load_sharded(state["dcp"], template)
        model_sd = {k: template[f"model.{k}"] for k in own}
        buffers = {i: template[key] for i, key in wanted.items()}
        groups = state.get("optimizer_groups")
    else:
        saved = state["model"]
        missing = [k for k in own if k not in saved]
        if missing:
            raise CheckpointError(f"checkpoint {path} does not fit this model/config: missing {missing[0]}")
        model_sd = {k: _like(saved[k], v) for k, v in own.items()}
        buffers = {int(i): _like(s["momentum_buffer"], order[int(i)])
                   for i, s in state["optimizer"]["state"].items() if s.get("momentum_buffer") is not None}
        groups = state["optimizer"]["param_groups"]
    if not groups:
        raise CheckpointError(f"checkpoint {path} has no optimizer parameter groups")
    try:
        net.load_state_dict(model_sd)
        optimizer.load_state_dict({"state": {i: {"momentum_buffer": b} for i, b in buffers.items()},
                                   "param_groups": groups})
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"checkpoint {path} does not fit this model/config: {first[-1] if first else e}") from None
