"""Test-only fault injection, as a wrapper around a method object: the step itself has no test hooks.

``NanSteps(method, steps)`` poisons the loss that is backpropagated at the given (0-based) steps, so
every gradient is NaN and the step's one verdict skips the update, as a real non-finite step would.
Tests install it on a ``Run`` (``run.method = NanSteps(run.method, {1})``); a subprocess test asks
the loop to install it with ``OPENSEER_FAULT_NAN_STEPS=2,5``. ``SlowFirstStep`` stands for a compile
(``OPENSEER_FAULT_SLOW_FIRST_STEP=SECONDS``).
"""

from __future__ import annotations

import os
import time

import torch

NAN_STEPS_ENV = "OPENSEER_FAULT_NAN_STEPS"
SLOW_FIRST_STEP_ENV = "OPENSEER_FAULT_SLOW_FIRST_STEP"


class NanSteps:
    """``method`` with a NaN loss backpropagated at ``steps``; everything else passes through."""

    def __init__(self, method, steps: set[int]):
        self.method, self.steps = method, set(steps)

    def __getattr__(self, name: str):
        return getattr(self.method, name)

    def forward_backward(self, crops: list[torch.Tensor], step: int, scale=None, mark=None, **kw):
        if step not in self.steps:
            return self.method.forward_backward(crops, step, scale=scale, mark=mark, **kw)

        def poisoned(loss: torch.Tensor) -> torch.Tensor:
            loss = loss * float("nan")
            return scale(loss) if scale else loss

        return self.method.forward_backward(crops, step, scale=poisoned, mark=mark, **kw)


class SlowFirstStep:
    """``method`` whose first forward/backward in this process sleeps ``seconds`` first: it stands for
    a compile (``first_step_compiles``: the loop treats that step as a model.compile's first step)."""

    first_step_compiles = True

    def __init__(self, method, seconds: float):
        self.method, self.seconds, self.done = method, seconds, False

    def __getattr__(self, name: str):
        return getattr(self.method, name)

    def forward_backward(self, crops: list[torch.Tensor], step: int, scale=None, mark=None):
        if not self.done:
            self.done = True
            time.sleep(self.seconds)
        return self.method.forward_backward(crops, step, scale=scale, mark=mark)


def from_env(method):
    """``method``, wrapped in ``NanSteps`` when ``OPENSEER_FAULT_NAN_STEPS`` names steps, and in
    ``SlowFirstStep`` when ``OPENSEER_FAULT_SLOW_FIRST_STEP`` gives seconds (tests only)."""
    steps = {int(x) for x in os.environ.get(NAN_STEPS_ENV, "").split(",") if x.strip()}
    method = NanSteps(method, steps) if steps else method
    slow = float(os.environ.get(SLOW_FIRST_STEP_ENV, "0") or 0)
    return SlowFirstStep(method, slow) if slow > 0 else method
