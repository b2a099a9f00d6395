"""SGD wrapped in LARC (scaling mode) and the LR schedule of docs/method.md §4.

LARC, per parameter p with weight decay wd and trust coefficient eta:
    local_lr = eta * ||w|| / (||g|| + wd * ||w|| + eps)      (skipped when ||w|| or ||g|| is 0)
    g <- (g + wd * w) * local_lr             (scaling mode; clip mode: * min(local_lr / lr, 1))
then a plain SGD-momentum step with lr and no further weight decay. Parameters whose gradient is
None (e.g. frozen prototypes) are skipped entirely: no momentum, no decay.

Under FSDP the parameters and gradients are DTensor shards; ||w|| and ||g|| must be the norms of
the WHOLE parameters (docs/method.md §4), so the squared norms of the local shards are summed over the
shard group (one all-reduce per step for all parameters) before the trust ratio is formed.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = ()  # type: ignore[assignment,misc]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def whole_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each whole tensor (stacked). Plain tensors: ``torch._foreach_norm``. DTensor shards
    (FSDP): local squared norms summed over the mesh dimensions the tensor is sharded on."""
    if not any(isinstance(t, DTensor) for t in tensors):
        return torch.stack(torch._foreach_norm(tensors))
    sq = torch.stack(torch._foreach_norm([_local(t) for t in tensors])).float() ** 2
    sharded = [isinstance(t, DTensor) and any(p.is_shard() for p in t.placements) for t in tensors]
    meshes = {t.device_mesh for t, s in zip(tensors, sharded) if s}
    if len(meshes) > 1 or any(m.ndim != 1 for m in meshes):
        raise NotImplementedError("LARC supports FSDP on one 1-D device mesh (no HSDP/TP)")
    if meshes:
        mask = torch.tensor(sharded, device=sq.device)
        part = torch.where(mask, sq, torch.zeros_like(sq))
        dist.all_reduce(part, group=next(iter(meshes)).get_group())
        sq = torch.where(mask, part, sq)
    return sq.sqrt()


class LARC:
    """Layer-wise adaptive rate control around ``torch.optim.SGD`` (foreach ops, one pass).

    LARC owns the weight decay (it is part of the trust ratio): each parameter group keeps it as
    ``larc_weight_decay`` and the wrapped SGD runs with ``weight_decay=0``, so nothing is switched
    off and on around every step. An SGD handed in with a weight decay gives it to LARC; an older
    optimiser state (weight decay in SGD's own key) is moved over the same way when loaded.

    ``check_grads()`` computes the gradient norms once for the finiteness check and keeps them for
    the ``step()`` that follows (``zero_grad`` forgets them).
    """

    def __init__(self, optimizer: torch.optim.SGD, trust_coefficient: float = 0.001, clip: bool = False,
                 eps: float = 1e-8):
        self.optim = optimizer
        self.trust_coefficient = trust_coefficient
        self.clip = clip
        self.eps = eps
        self._grad_norms: list[torch.Tensor | None] | None = None
        self._own_weight_decay()

    def _own_weight_decay(self) -> None:
        for group in self.optim.param_groups:
            if "larc_weight_decay" not in group:
                group["larc_weight_decay"] = group.get("weight_decay", 0.0)
            group["weight_decay"] = 0.0

    @property
    def param_groups(self):
        return self.optim.param_groups

    def state_dict(self) -> dict:
        return self.optim.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optim.load_state_dict(state)
        self._own_weight_decay()
        self._grad_norms = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._grad_norms = None
        self.optim.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def _norms(self) -> list[torch.Tensor | None]:
        """Whole-parameter gradient norms per group (None for a group without gradients)."""
        out = []
        for group in self.param_groups:
            grads = [p.grad for p in group["params"] if p.grad is not None]
            out.append(whole_norms(grads) if grads else None)
        return out

    @torch.no_grad()
    def check_grads(self) -> torch.Tensor:
        """A 0-d bool tensor on the device: every gradient finite. Does not wait for the device; the
        norms it computes are reused by the next ``step()``."""
        self._grad_norms = self._norms()
        norms = [n for n in self._grad_norms if n is not None]
        if not norms:
            return torch.ones((), dtype=torch.bool)
        return torch.isfinite(torch.cat(norms)).all()

    def grads_finite(self) -> bool:
        """True when every gradient is finite (waits for the device)."""
        return bool(self.check_grads())

    @torch.no_grad()
    def step(self) -> None:
        g_norm_groups = self._grad_norms if self._grad_norms is not None else self._norms()
        self._grad_norms = None
        for group, g_norms in zip(self.param_groups, g_norm_groups):
            wd = group["larc_weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            w_norms = whole_norms(params)
            local = self.trust_coefficient * w_norms / (g_norms + wd * w_norms + self.eps)
            if self.clip:
                local = torch.clamp(local / group["lr"], max=1.0)
            local = torch.where((w_norms > 0) & (g_norms > 0), local, torch.ones_like(local))
            if any(isinstance(p, DTensor) for p in params):  # scale the local shards in place
                params, grads = [_local(p) for p in params], [_local(g) for g in grads]
            if wd:
                torch._foreach_add_(grads, params, alpha=wd)
            torch._foreach_mul_(grads, list(local.unbind()))
        self.optim.step()


def build_optimizer(model: torch.nn.Module, cfg) -> LARC:
    """SGD(momentum, no weight decay of its own) + LARC with the weight decay on all parameters, from
    ``cfg.optim``."""
    o = cfg.optim
    # a model may split its parameters into groups with an ``lr_scale`` (finetune: a slower backbone)
    params = model.optim_groups() if hasattr(model, "optim_groups") else model.parameters()
    sgd = torch.optim.SGD(params, lr=0.0, momentum=o.momentum, weight_decay=0.0, foreach=True)
    for group in sgd.param_groups:
        group["larc_weight_decay"] = o.weight_decay
    return LARC(sgd, trust_coefficient=o.lars_trust, clip=o.lars_clip)


def peak_lr(base_lr: float, global_batch: int) -> float:
    """Linear scaling: ``base_lr`` per 256 images."""
    return base_lr * global_batch / 256


def lr_at(step: int, total_steps: int, peak: float, warmup_steps: int, warmup_start_ratio: float,
          final_lr_ratio: float, time_fraction: float = 0.0) -> float:
    """Linear warmup from ``warmup_start_ratio * peak`` to ``peak``, then cosine to ``final_lr_ratio * peak``.

    Steps run from 0 to ``total_steps - 1``: step 0 gets the warmup start, step ``warmup_steps`` the
    peak and the last step (``total_steps - 1``) exactly the final LR. Under a time budget
    (``optim.minutes``) the cosine follows whichever is further along: the steps or
    ``time_fraction``, the share of the budget already spent (1 gives the final LR).
    """
    start, final = peak * warmup_start_ratio, peak * final_lr_ratio
    if step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    decay = max(total_steps - 1 - warmup_steps, 1)
    t = max(min(step - warmup_steps, decay) / decay, min(max(time_fraction, 0.0), 1.0))
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * t))


def scheduled_lr(sched: dict, optim_cfg, step: int, time_fraction: float = 0.0) -> float:
    """The LR of ``step`` in a run's schedule: ``lr_at`` over ``sched['total_steps']``, and, after a
    resume that extended the run (``sched['rewarm']``, see ``extend_schedule``), a linear ramp from
    the LR where the run had stopped up to that curve over the re-warm steps."""
    o = optim_cfg
    lr = lr_at(step, sched["total_steps"], sched["peak_lr"], o.warmup_steps, o.warmup_start_ratio,
               o.final_lr_ratio, time_fraction=time_fraction)
    rewarm = sched.get("rewarm")
    if rewarm and rewarm["step"] <= step < rewarm["step"] + rewarm["steps"]:
        done = (step - rewarm["step"] + 1) / rewarm["steps"]
        lr = rewarm["lr"] + (lr - rewarm["lr"]) * done
    return lr


def extend_schedule(sched: dict, before: dict, optim_before, optim_now, step: int, spent_s: float) -> dict | None:
    """Re-plan a run that a resume makes longer (a larger ``optim.epochs`` or ``optim.minutes``).

    ``sched`` is the schedule of the longer run (``total_steps`` from the new epochs), ``before`` the
    checkpoint's schedule (``optim_before`` its optimiser settings). The run goes on from where it
    stands: its steps and training seconds so far count, the cosine is the one the longer run would
    have had from the start, and, since a run that stopped sits at (or near) its final LR, the LR
    ramps linearly from there back up to that cosine over a re-warm of a tenth of what is left (at
    least 2 steps, at most ``optim.warmup_steps``), instead of jumping. Adds ``rewarm`` and an ``extended``
    record to ``sched`` and returns the record; None when nothing grew (a plain, bit-exact resume).
    """
    for key in ("extended", "rewarm"):  # earlier extensions stay part of the schedule
        if before.get(key):
            sched[key] = before[key]
    grew_epochs = optim_now.epochs != optim_before.epochs
    grew_minutes = optim_now.minutes != optim_before.minutes
    if not (grew_epochs or grew_minutes):
        return None
    last = max(step - 1, 0)
    old_budget, new_budget = optim_before.minutes * 60, optim_now.minutes * 60
    lr_before = scheduled_lr(before, optim_before, last, min(spent_s / old_budget, 1.0) if old_budget else 0.0)
    lr_planned = scheduled_lr({**sched, "rewarm": None}, optim_now, step,
                              spent_s / new_budget if new_budget else 0.0)
    left = sched["total_steps"] - step
    if new_budget and step and spent_s > 0:  # steps the clock leaves, at the rate so far
        left = min(left, int((new_budget - spent_s) * step / spent_s))
    rewarm_steps = max(1, min(optim_now.warmup_steps, max(left // 10, 2)))  # a ramp of at least 2 steps
    if lr_planned > lr_before and step >= optim_now.warmup_steps and left > 1:
        sched["rewarm"] = {"step": step, "lr": lr_before, "steps": rewarm_steps}
    else:
        rewarm_steps = 0
    record = {"at_step": step, "train_seconds": round(spent_s, 3),
              "from": {"epochs": optim_before.epochs, "minutes": optim_before.minutes,
                       "total_steps": before.get("total_steps")},
              "to": {"epochs": optim_now.epochs, "minutes": optim_now.minutes, "total_steps": sched["total_steps"]},
              "lr_before": lr_before, "lr_planned": lr_planned, "rewarm_steps": rewarm_steps}
    sched["extended"] = [*sched.get("extended", []), record]
    return record
