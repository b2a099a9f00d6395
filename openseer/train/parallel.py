"""The model as a multi-process run trains it: activation checkpointing, SyncBN, then DDP or FSDP2.

``prepare_model(model, cfg, env, device)`` is the one entry point the loop calls. With one process
and activation checkpointing off it returns the model untouched (the single-process path is
bit-exact with and without this module). Otherwise, in this order:

1. activation checkpointing per residual block of the chosen backbone stages (``dist.activation_
   checkpointing``); BatchNorm running statistics are not updated twice by the recompute;
2. SyncBN over groups of ``dist.syncbn_group_size`` consecutive ranks: on GPU torch's
   ``SyncBatchNorm`` (via timm's converter, so its norm+act layers keep their activation). torch's
   only runs on GPUs (and DDP refuses it on CPU), so on CPU (gloo) ``CPUSyncBatchNorm`` all-reduces
   the same statistics with differentiable collectives, and the CPU tests check the real math;
3. ``dist.strategy=ddp``: DistributedDataParallel; ``fsdp``: FSDP2 ``fully_shard`` per backbone
   stage (or block), the head, the prototypes (kept in fp32 by their own MixedPrecisionPolicy) and
   the root. Parameters then are DTensors; LARC (optim.py) computes whole-parameter norms from them.
"""

from __future__ import annotations

import re
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from ..model.backbone import BackboneError
from .distributed import DistEnv, syncbn_group

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = ()  # type: ignore[assignment,misc]


def prepare_model(model: nn.Module, cfg, env: DistEnv, device: torch.device) -> nn.Module:
    """Wrap ``model`` (a SwAV on ``device``) for this world size and ``cfg.dist``."""
    d = cfg.dist
    if d.activation_checkpointing:
        checkpoint_blocks(model.backbone, d.activation_checkpointing_stages)
    if env.world_size == 1:
        return model
    if d.syncbn_group_size:
        model = convert_sync_batchnorm(model, syncbn_group(d.syncbn_group_size), device)
    if d.strategy == "fsdp":
        return shard_model(model, cfg, device)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def is_sharded(model: nn.Module) -> bool:
    """True when the parameters are FSDP2 shards (DTensors)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective: every rank must call it); other tensors as is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: in-place changes reach the DTensor); other tensors as is."""
    return t.to_local() if isinstance(t, DTensor) else t


# ---------------------------------------------------------------- stages and blocks


def backbone_stages(backbone: nn.Module) -> list[nn.Module]:
    """The residual stages of a timm backbone, in order: RegNet ``s1..s4``, ResNet ``layer1..4``, or ``stages``."""
    named = dict(backbone.named_children())
    for pattern in (r"s(\d+)", r"layer(\d+)"):
        found = sorted((int(m.group(1)), mod) for n, mod in named.items() if (m := re.fullmatch(pattern, n)))
        if found:
            return [mod for _, mod in found]
    if isinstance(named.get("stages"), nn.Sequential | nn.ModuleList):
        return list(named["stages"])
    raise BackboneError(f"{type(backbone).__name__} has no stages this code knows (RegNet s1..s4, ResNet "
                        f"layer1..4, or a 'stages' container): activation checkpointing and "
                        f"dist.fsdp_wrap=block need them")


def _blocks(stage: nn.Module) -> list[nn.Module]:
    return [b for b in stage.children() if any(True for _ in b.parameters())] or [stage]


def fsdp_units(backbone: nn.Module, wrap: str) -> list[nn.Module]:
    """Backbone modules that become FSDP units: every child with parameters (stem, stages), with the
    stages split into their blocks for ``wrap='block'``."""
    stages = backbone_stages(backbone) if wrap == "block" else []
    units = []
    for child in backbone.children():
        if not any(True for _ in child.parameters()):
            continue
        units.extend(_blocks(child) if any(child is s for s in stages) else [child])
    return units


# ---------------------------------------------------------------- activation checkpointing


class _KeepNormStats:
    """Context for the recompute: BatchNorm running statistics come back as they were before it."""

    def __init__(self, module: nn.Module):
        self.norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]

    def __enter__(self):
        self.saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                      for m in self.norms]
        return self

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for m, (mean, var, n) in zip(self.norms, self.saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(n)


def _checkpointed(block: nn.Module):
    forward = block.forward

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False,
                          context_fn=lambda: (nullcontext(), _KeepNormStats(block)), **kwargs)

    return run


def checkpoint_blocks(backbone: nn.Module, stages: list[int] | None = None) -> int:
    """Recompute each residual block of ``stages`` (1-based; empty = all) in backward; returns how many.

    The block's ``forward`` is replaced on the instance, so parameter names and state dicts do not
    change. Only the block inputs stay in memory; one block's activations are rebuilt at a time.
    """
    all_stages = backbone_stages(backbone)
    chosen = list(stages or range(1, len(all_stages) + 1))
    bad = [s for s in chosen if not 1 <= s <= len(all_stages)]
    if bad:
        raise BackboneError(f"dist.activation_checkpointing_stages has {bad}; this backbone has stages "
                            f"1..{len(all_stages)}")
    n = 0
    for s in chosen:
        for block in _blocks(all_stages[s - 1]):
            block.forward = _checkpointed(block)
            n += 1
    return n


# ---------------------------------------------------------------- SyncBN


class CPUSyncBatchNorm(_BatchNorm):
    """SyncBatchNorm for CPU processes (gloo), with the optional activation of timm's BatchNormAct2d.

    In training mode the batch mean and variance are computed over the process group with two
    differentiable all-reduces (sum, then the sum of squared deviations): exactly the statistics of
    one process holding the group's whole batch; gradients flow back across ranks as in torch's
    SyncBatchNorm. In eval mode it is a plain BatchNorm.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and dist.is_available() and dist.is_initialized():
            x = _cpu_sync_batch_norm(self, x)
        else:
            x = super().forward(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; the gradient of every rank's input is the sum of all ranks' output gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _cpu_sync_batch_norm(bn: CPUSyncBatchNorm, x: torch.Tensor) -> torch.Tensor:
    group = bn.process_group or dist.group.WORLD
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    xf = x.float()
    count = torch.tensor([x.numel() // x.shape[1]], dtype=xf.dtype)
    stats = _AllReduceSum.apply(torch.cat([xf.sum(dims), count]), group)
    n = stats[-1]
    mean = stats[:-1] / n
    centred = xf - mean.view(shape)
    var = _AllReduceSum.apply((centred * centred).sum(dims), group) / n
    y = centred * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.float().view(shape) + bn.bias.float().view(shape)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            total = float(n)
            unbiased = var.detach() * (total / max(total - 1.0, 1.0))
            bn.running_mean.mul_(1 - momentum).add_(mean.detach().to(bn.running_mean.dtype), alpha=momentum)
            bn.running_var.mul_(1 - momentum).add_(unbiased.to(bn.running_var.dtype), alpha=momentum)
    return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, process_group=None, device: torch.device | str = "cpu") -> nn.Module:
    """Every BatchNorm (incl. timm's BatchNormAct2d, whose activation is kept) -> SyncBN over ``process_group``:
    torch's ``SyncBatchNorm`` on GPUs (``timm.layers.convert_sync_batchnorm``), ``CPUSyncBatchNorm`` on CPU."""
    if torch.device(device).type != "cpu":
        from timm.layers import convert_sync_batchnorm as timm_convert

        return timm_convert(module, process_group)
    return _convert_cpu(module, process_group)


def _convert_cpu(module: nn.Module, process_group) -> nn.Module:
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, nn.SyncBatchNorm | CPUSyncBatchNorm):
        out = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, process_group)
        if module.affine:
            out.weight = module.weight
            out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, _convert_cpu(child, process_group))
    return out


# ---------------------------------------------------------------- FSDP2


def shard_model(model: nn.Module, cfg, device: torch.device) -> nn.Module:
    """FSDP2: one unit per backbone stage/block, the head, the prototypes (fp32) and the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    for p in model.parameters():  # FSDP shards flat storage: channels_last weights go back to contiguous
        p.data = p.data.contiguous()
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.optim.precision)
    mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    for unit in fsdp_units(model.backbone, cfg.dist.fsdp_wrap):
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    fully_shard(model.head, mesh=mesh, mp_policy=mp)
    fully_shard(model.prototypes, mesh=mesh, mp_policy=fp32)  # docs/method.md §4: the prototype layer stays fp32
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model
