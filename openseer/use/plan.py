"""``openseer plan``: parameters and per-GPU memory of a recipe on N GPUs, before renting them.

Everything is built on the meta device (shapes only, no memory, under a second even for the 10B):

* parameters: exact counts of the instantiated trunk, head and prototypes;
* activations: one forward of the recipe's crops at the per-rank batch on meta tensors, recording
  every tensor autograd saves for backward (distinct storages, parameters excluded), per residual
  block, in the compute dtype. With activation checkpointing only the checkpointed blocks' inputs
  stay, plus one block's activations while it is recomputed;
* per-rank memory under DDP and FSDP (full sharding), with and without activation checkpointing:

  DDP   weights 4P + gradients 4P + DDP gradient buckets 4P + SGD momentum 4P
        (+ 2P for the 16-bit weight copies autocast keeps during the forward)
  FSDP  (weights + gradients + momentum) 12P / N + two gathered units in the compute dtype
        (the one computing and the one prefetched) + two units of unsharded fp32 gradients
        (reduce-scatter input); a unit is a backbone stage or block (``dist.fsdp_wrap``), the head,
        or the prototypes

  plus activations, twice the largest saved activation (its gradient and the incoming one) and a
  fixed 2 GiB for the CUDA context, NCCL buffers and allocator fragmentation.

These are estimates of the peak (real peaks depend on the allocator and kernels); they are meant
to tell 40 GB from 80 GB and 64 GPUs from 512, not to the last gigabyte. GiB = 2**30 bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import OpenseerError
from ..model.swav import build_swav
from ..train.parallel import _blocks, backbone_stages, fsdp_units

GIB = 2**30
OVERHEAD_BYTES = 2 * GIB


class PlanError(OpenseerError, ValueError):
    """A plan that cannot be made or cannot fit; the message says what would."""


@dataclass
class Strategy:
    name: str
    fsdp: bool
    checkpointing: bool


STRATEGIES = [Strategy("DDP", False, False), Strategy("DDP + act. ckpt", False, True),
              Strategy("FSDP", True, False), Strategy("FSDP + act. ckpt", True, True)]


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_meta(cfg) -> nn.Module:
    """The recipe's SwAV model on the meta device (no memory)."""
    return build_swav(cfg, device="meta")


def parameter_counts(cfg, model: nn.Module | None = None) -> dict[str, int]:
    """Exact parameter counts (trunk, head, prototypes, total) of the instantiated model."""
    model = model if model is not None else build_meta(cfg)
    out = {"trunk": _count(model.backbone), "head": _count(model.head), "prototypes": _count(model.prototypes)}
    out["total"] = sum(out.values())
    return out


def compute_dtype(cfg) -> torch.dtype:
    """The dtype activations are planned in (``auto`` plans for bf16, what it picks on current GPUs)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "auto": torch.bfloat16}.get(cfg.optim.precision,
                                                                                      torch.float32)


def activation_bytes(cfg, batch_per_rank: int, model: nn.Module | None = None) -> dict[str, int]:
    """Bytes autograd keeps for backward in one training forward at ``batch_per_rank`` (meta device).

    Returns ``plain`` (no checkpointing), ``checkpointed`` (the blocks of
    ``dist.activation_checkpointing_stages``, all when empty, recomputed in backward) and
    ``largest`` (the biggest single saved tensor).
    """
    model = model if model is not None else build_meta(cfg)
    dtype = compute_dtype(cfg)
    model = model.to(dtype).train()
    protos = model.prototypes.layer.weight
    param_keys = {p.untyped_storage()._cdata for p in model.parameters()}
    stages = backbone_stages(model.backbone)
    chosen = cfg.dist.activation_checkpointing_stages or list(range(1, len(stages) + 1))

    saved: dict[int, tuple[int, object]] = {}  # storage -> (bytes, owner call)
    inputs: dict[int, int] = {}  # checkpointed block inputs: storage -> bytes
    current: list = [None]
    calls: list[int] = [0]

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        key = st._cdata
        if key not in param_keys and key not in saved:
            saved[key] = (st.nbytes(), current[0])
        return t

    def pre(module, args):
        calls[0] += 1
        current[0] = calls[0]
        for a in args:
            if isinstance(a, torch.Tensor):
                inputs.setdefault(a.untyped_storage()._cdata, a.untyped_storage().nbytes())

    def post(module, args, output):
        current[0] = None

    handles = []
    for s in chosen:
        if 1 <= s <= len(stages):
            for b in _blocks(stages[s - 1]):
                handles += [b.register_forward_pre_hook(pre), b.register_forward_hook(post)]
    crops = []
    for size, count in zip(cfg.crops.sizes, cfg.crops.counts):
        crops += [torch.empty(batch_per_rank, 3, size, size, device="meta", dtype=dtype)] * count
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            z = F.normalize(model.head(model.features(crops)).float(), dim=1)
            scores = F.linear(z, protos.float())  # the prototype layer runs in fp32 (docs/method.md §4)
            logp = F.log_softmax(scores / cfg.swav.temperature, dim=1)
            (logp * torch.empty_like(logp)).sum()
    finally:
        for h in handles:
            h.remove()
    plain = sum(b for b, _ in saved.values())
    kept = {k: b for k, (b, owner) in saved.items() if owner is None}
    for k, b in inputs.items():
        kept.setdefault(k, b)
    per_call: dict = {}
    for b, owner in saved.values():
        if owner is not None:
            per_call[owner] = per_call.get(owner, 0) + b
    checkpointed = sum(kept.values()) + max(per_call.values(), default=0)
    return {"plain": plain, "checkpointed": checkpointed, "largest": max((b for b, _ in saved.values()), default=0)}


def _units(model: nn.Module, wrap: str) -> list[int]:
    units = [_count(u) for u in fsdp_units(model.backbone, wrap)]
    units += [_count(model.head), _count(model.prototypes)]
    return units


def memory_per_rank(params: int, biggest_unit: int, acts: dict[str, int], world: int, strategy: Strategy,
                    dtype: torch.dtype) -> dict[str, int]:
    """Bytes per rank by component (see the module docstring for the formulas)."""
    c = torch.empty((), dtype=dtype).element_size()
    act = acts["checkpointed"] if strategy.checkpointing else acts["plain"]
    if strategy.fsdp:
        shard = -(-params // world)
        rows = {"weights": 4 * shard, "gradients": 4 * shard, "momentum": 4 * shard,
                "gathered units": 2 * biggest_unit * c, "unsharded gradients": 2 * biggest_unit * 4}
    else:
        rows = {"weights": 4 * params, "gradients": 4 * params, "DDP buckets": 4 * params,
                "momentum": 4 * params}
        if c < 4:
            rows["16-bit weight copies"] = c * params
    rows.update({"activations": act, "backward transients": 2 * acts["largest"], "runtime overhead": OVERHEAD_BYTES})
    rows["total"] = sum(rows.values())
    return rows


def make_plan(cfg, gpus: int, gpu_mem_gb: float) -> dict:
    """The plan of ``cfg`` on ``gpus`` GPUs of ``gpu_mem_gb`` GiB: counts, memory per strategy, verdicts."""
    if gpus < 1:
        raise PlanError(f"--gpus must be >= 1; got {gpus}")
    if not gpu_mem_gb > 0:
        raise PlanError(f"--gpu-mem-gb must be > 0; got {gpu_mem_gb}")
    gb = cfg.data.batch_size
    if gb % gpus:
        near = sorted({d for d in range(1, gb + 1) if gb % d == 0}, key=lambda d: abs(d - gpus))[:3]
        raise PlanError(f"data.batch_size={gb} (global) is not divisible by {gpus} GPUs; use a GPU count that "
                        f"divides it (nearest: {', '.join(map(str, sorted(near)))}) or set data.batch_size")
    model = build_meta(cfg)
    counts = parameter_counts(cfg, model)
    units = _units(model, cfg.dist.fsdp_wrap)
    dtype = compute_dtype(cfg)
    limit = gpu_mem_gb * GIB

    def rows_for(world: int) -> dict[str, dict]:
        acts = activation_bytes(cfg, gb // world, build_meta(cfg))
        return {s.name: memory_per_rank(counts["total"], max(units), acts, world, s, dtype) for s in STRATEGIES}

    rows = rows_for(gpus)
    fits = {name: r["total"] <= limit for name, r in rows.items()}
    plan = {
        "recipe": cfg.recipe, "arch": cfg.model.arch, "gpus": gpus, "gpu_mem_gib": gpu_mem_gb,
        "global_batch": gb, "batch_per_gpu": gb // gpus, "precision": cfg.optim.precision,
        "crops": [f"{n}x{s}" for n, s in zip(cfg.crops.counts, cfg.crops.sizes)],
        "params": counts, "fsdp_wrap": cfg.dist.fsdp_wrap, "fsdp_units": len(units), "biggest_unit": max(units),
        "memory": rows, "fits": fits,
    }
    if not any(fits.values()):
        plan["min_gpus"] = _min_gpus(gb, limit, rows_for, start=gpus)
    return plan


def _min_gpus(gb: int, limit: float, rows_for, start: int) -> int | None:
    """The smallest GPU count above ``start`` dividing the global batch at which FSDP + checkpointing fits."""
    for world in (d for d in range(start + 1, gb + 1) if gb % d == 0):
        if rows_for(world)["FSDP + act. ckpt"]["total"] <= limit:
            return world
    return None


def format_plan(plan: dict) -> str:
    """A human-readable report of ``make_plan``'s result."""
    p = plan["params"]
    lines = [
        f"plan: recipe {plan['recipe']} ({plan['arch']}), {plan['gpus']} GPUs x {plan['gpu_mem_gib']:g} GiB, "
        f"global batch {plan['global_batch']} ({plan['batch_per_gpu']}/GPU), crops {' + '.join(plan['crops'])}, "
        f"{plan['precision']}",
        f"parameters: trunk {p['trunk']:,} ({p['trunk'] / 1e9:.3g}B), head {p['head']:,}, "
        f"prototypes {p['prototypes']:,}, total {p['total']:,}",
        f"FSDP units ({plan['fsdp_wrap']}): {plan['fsdp_units']}, biggest {plan['biggest_unit']:,} parameters",
        "",
    ]
    names = list(plan["memory"])
    components = list(dict.fromkeys(k for r in plan["memory"].values() for k in r if k != "total"))
    width = max(len(c) for c in [*components, "per-GPU memory (GiB)"])
    lines.append("per-GPU memory (GiB)".ljust(width) + "".join(f"{n:>18}" for n in names))
    for comp in [*components, "total"]:
        cells = [plan["memory"][n].get(comp) for n in names]
        lines.append(comp.ljust(width) + "".join(f"{'-' if v is None else f'{v / GIB:.2f}':>18}" for v in cells))
    lines.append("fits".ljust(width) + "".join(f"{'yes' if plan['fits'][n] else 'NO':>18}" for n in names))
    ok = [n for n in names if plan["fits"][n]]
    lines.append("")
    if ok:
        lines.append(f"fits with: {', '.join(ok)} (recipe uses dist.strategy and dist.activation_checkpointing)")
    return "\n".join(lines)


def plan_json(plan: dict) -> str:
    return json.dumps(plan, indent=1)
