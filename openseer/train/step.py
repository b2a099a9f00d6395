"""One training step: ``train_step(run, batch) -> StepStats``.

The step is method-agnostic: the method object (``SwAVMethod`` in model/swav.py, ``DistillMethod``
in train/methods/distill.py) owns its forward,
targets, loss and backward; the step sets the LR, checks the gradients once (their norms are kept
for LARC), agrees with every rank in ONE all-reduce on whether the step is good, whether anyone was
asked to stop and how long the run has been going (the time budget), then steps the optimiser or
skips. Per step it waits for the device once, for that verdict; everything else it reports stays
on the device until a log step reads it (train/metrics.py).

A method object provides (see docs/distributed.md, "The step and the method object"):
  ``model``  the module that trains (DDP/FSDP-wrapped as the loop prepared it)
  ``phases`` names of the phases ``forward_backward`` marks, in order
  ``forward_backward(crops, step, scale=None, mark=None) -> MethodOutput`` forward + loss + backward
  ``after_step(step)`` after an optimiser step that was taken (e.g. re-normalise, EMA teacher)
  ``diagnose(out) -> dict`` JSON-ready facts for a non-finite step
(and, for the loop around the step, ``state_dict``/``load_state_dict``, ``row`` and ``collapse_loss``:
see train/methods/__init__.py). Test-only fault injection wraps the method (train/faults.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import Config
from ..data.batches import Batch
from ..model.swav import MethodOutput
from .distributed import DistEnv, step_verdict
from .optim import LARC, scheduled_lr

PHASE_TIMING_ENV = "OPENSEER_PHASE_TIMING"  # 1: synchronise the GPU around every phase of every step


@dataclass
class Run:
    """What every step needs, set up once by ``pretrain`` (train/loop.py)."""

    cfg: Config
    device: torch.device
    env: DistEnv
    sched: dict
    method: Any  # a method object (module docstring)
    optimizer: LARC
    scaler: torch.amp.GradScaler | None = None
    step: int = 0  # steps done so far
    counters: dict = field(default_factory=dict)  # saved in checkpoints: skipped steps, images seen, ...
    spent_s: float = 0.0  # wall-clock seconds of training so far, the slowest rank's (resumes too)
    t_loop: float = 0.0  # perf_counter() at which the run's clock reads 0
    stop_requested: Any = None  # () -> bool: a signal asked this rank to stop

    @property
    def budget_s(self) -> float:
        return self.cfg.optim.minutes * 60

    def phase_timed(self, step: int) -> bool:
        """Phase times need the device synchronised around each phase: on CUDA only on log steps
        (where the step waits anyway) unless OPENSEER_PHASE_TIMING=1; the CPU never waits."""
        if self.device.type != "cuda" or os.environ.get(PHASE_TIMING_ENV) == "1":
            return True
        return (step + 1) % self.cfg.log.every == 0


@dataclass
class StepStats:
    """One step's outcome. ``loss`` and ``stats`` are 0-d device tensors (read on log steps only)."""

    step: int  # the step just done (0-based)
    lr: float
    images: int  # global images in the step
    bad: bool  # non-finite loss or gradient on some rank: the update was skipped
    stop_signalled: bool  # some rank was asked to stop
    spent_s: float  # the run's clock after the step (slowest rank)
    loss: torch.Tensor
    stats: dict[str, torch.Tensor]
    phases: dict[str, float] | None  # seconds per phase, when this step was timed
    output: MethodOutput  # for a diagnostic of a bad step


class PhaseTimer:
    """Seconds per named phase; synchronises CUDA before each mark only when enabled."""

    def __init__(self, device: torch.device, enabled: bool):
        self.enabled = enabled
        self.cuda = device.type == "cuda"
        self.device = device
        self.phases: dict[str, float] = {}
        self._t = time.perf_counter()

    def mark(self, phase: str) -> None:
        if not self.enabled:
            return
        if self.cuda:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._t
        self._t = now


def train_step(run: Run, batch: Batch) -> StepStats:
    """Train on one batch: LR, the method's forward/backward, one verdict across ranks, optimiser step."""
    cfg, step, optimizer = run.cfg, run.step, run.optimizer
    timer = PhaseTimer(run.device, run.phase_timed(step))
    crops = [c.to(run.device, non_blocking=True) for c in batch.crops]
    budget = run.budget_s
    lr = scheduled_lr(run.sched, cfg.optim, step, time_fraction=run.spent_s / budget if budget else 0.0)
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)  # a method's group may train slower (finetune: the backbone)

    optimizer.zero_grad(set_to_none=True)
    keys = {"keys": batch.keys} if getattr(run.method, "takes_keys", False) else {}  # supervised: labels by key
    out = run.method.forward_backward(crops, step, scale=run.scaler.scale if run.scaler else None, mark=timer.mark,
                                      **keys)
    if run.scaler:
        run.scaler.unscale_(optimizer.optim)
    finite = torch.isfinite(out.loss) & optimizer.check_grads()
    stop = bool(run.stop_requested()) if run.stop_requested else False
    bad, stop_signalled, spent = step_verdict(~finite, stop, time.perf_counter() - run.t_loop, run.device)
    if bad:
        optimizer.zero_grad(set_to_none=True)
    else:
        if run.scaler:
            run.scaler.step(optimizer)
            run.scaler.update()
        else:
            optimizer.step()
        run.method.after_step(step)
    timer.mark("optimizer")
    run.step = step + 1
    run.spent_s = spent
    return StepStats(step=step, lr=lr, images=len(batch.keys) * run.env.world_size, bad=bad,
                     stop_signalled=stop_signalled, spent_s=spent, loss=out.loss, stats=out.stats,
                     phases=timer.phases if timer.enabled else None, output=out)
