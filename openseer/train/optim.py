"""SGD wrapped in LARC (scaling mode) and the LR schedule of SEER.md §4.

LARC, per parameter p with weight decay wd and trust coefficient eta:
    local_lr = eta * ||w|| / (||g|| + wd * ||w|| + eps)      (skipped when ||w|| or ||g|| is 0)
    g <- (g + wd * w) * local_lr             (scaling mode; clip mode: * min(local_lr / lr, 1))
then a plain SGD-momentum step with lr and no further weight decay. Parameters whose gradient is
None (e.g. frozen prototypes) are skipped entirely: no momentum, no decay.
"""

from __future__ import annotations

import math

import torch


class LARC:
    """Layer-wise adaptive rate control around ``torch.optim.SGD`` (foreach ops, one pass)."""

    def __init__(self, optimizer: torch.optim.SGD, trust_coefficient: float = 0.001, clip: bool = False,
                 eps: float = 1e-8):
        self.optim = optimizer
        self.trust_coefficient = trust_coefficient
        self.clip = clip
        self.eps = eps

    @property
    def param_groups(self):
        return self.optim.param_groups

    def state_dict(self) -> dict:
        return self.optim.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optim.load_state_dict(state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optim.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def grads_finite(self) -> bool:
        """True when every gradient is finite (one fused check)."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True
        norms = torch._foreach_norm(grads)
        return bool(torch.isfinite(torch.stack(norms)).all())

    @torch.no_grad()
    def step(self) -> None:
        saved_wd = []
        for group in self.param_groups:
            wd = group.get("weight_decay", 0.0)
            saved_wd.append(wd)
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            w_norms = torch.stack(torch._foreach_norm(params))
            g_norms = torch.stack(torch._foreach_norm(grads))
            local = self.trust_coefficient * w_norms / (g_norms + wd * w_norms + self.eps)
            if self.clip:
                local = torch.clamp(local / group["lr"], max=1.0)
            local = torch.where((w_norms > 0) & (g_norms > 0), local, torch.ones_like(local))
            if wd:
                torch._foreach_add_(grads, params, alpha=wd)
            torch._foreach_mul_(grads, list(local.unbind()))
            group["weight_decay"] = 0.0
        self.optim.step()
        for group, wd in zip(self.param_groups, saved_wd):
            group["weight_decay"] = wd


def build_optimizer(model: torch.nn.Module, cfg) -> LARC:
    """SGD(momentum, weight decay on all parameters) + LARC from ``cfg.optim``."""
    o = cfg.optim
    sgd = torch.optim.SGD(model.parameters(), lr=0.0, momentum=o.momentum, weight_decay=o.weight_decay,
                          foreach=True)
    return LARC(sgd, trust_coefficient=o.lars_trust, clip=o.lars_clip)


def peak_lr(base_lr: float, global_batch: int) -> float:
    """Linear scaling: ``base_lr`` per 256 images."""
    return base_lr * global_batch / 256


def lr_at(step: int, total_steps: int, peak: float, warmup_steps: int, warmup_start_ratio: float,
          final_lr_ratio: float) -> float:
    """Linear warmup from ``warmup_start_ratio * peak`` to ``peak``, then cosine to ``final_lr_ratio * peak``."""
    start, final = peak * warmup_start_ratio, peak * final_lr_ratio
    if step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    decay = max(total_steps - warmup_steps, 1)
    t = min(step - warmup_steps, decay) / decay
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * t))
