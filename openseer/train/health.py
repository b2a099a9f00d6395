"""Health of a run: non-finite steps (skipped, diagnosed, and a stop after too many in a row), loss
spikes and collapse (a loss stuck near ln K). Bad steps are known on the host at once (the step's
verdict); spikes and collapse read the losses a log window kept on the device, when it is read."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..config import Config
from ..rundir import (
    RunError,  # noqa: F401  (a run that cannot start or continue; re-exported for callers)
    diagnostic_path,
)
from .distributed import DistEnv
from .step import StepStats


class Health:
    """Skipped steps, spikes and (when the method has a collapse level, SwAV's ln K) collapse."""

    def __init__(self, cfg: Config, run_dir: Path, env: DistEnv, counters: dict, message,
                 collapse_loss: float | None = None):
        self.cfg, self.run_dir, self.env, self.counters, self.message = cfg, run_dir, env, counters, message
        self.collapse_loss = collapse_loss
        counters.setdefault("loss_spikes", 0)
        self.loss_ema: float | None = None
        self.collapse_run, self.collapse_warned, self.bad_in_a_row = 0, False, 0

    def after_step(self, s: StepStats, method, keys) -> None:
        """Count a skipped step, write its diagnostic, stop after ``optim.max_bad_steps`` in a row."""
        if not s.bad:
            self.bad_in_a_row = 0
            return
        self.counters["skipped_steps"] += 1
        self.bad_in_a_row += 1
        loss = float(s.loss)
        path = diagnostic_path(self.run_dir, s.step, self.env.rank)
        folder = path.parent
        write_diagnostic(path, s.step, loss, method.diagnose(s.output), keys, self.env)
        self.message(f"step {s.step}: non-finite loss or gradient ({loss}); step skipped "
                     f"({self.bad_in_a_row} in a row), diagnostic in {folder}")
        if self.bad_in_a_row >= self.cfg.optim.max_bad_steps:
            raise RunError(f"{self.bad_in_a_row} consecutive non-finite steps at step {s.step}: stopping. "
                           f"Lower optim.base_lr, use optim.precision=fp32, or check the data "
                           f"(diagnostics in {folder})")

    def observe(self, history: list[tuple[int, bool, float]]) -> None:
        """Spikes and collapse over a window's losses, (step done, bad, loss) in order."""
        level = self.collapse_loss
        for step, bad, loss in history:
            if not bad:
                if self.loss_ema is not None and step > 20 and loss > 1.5 * self.loss_ema + 0.5:
                    self.counters["loss_spikes"] += 1
                    self.message(f"step {step}: loss spike {loss:.3f} (recent average {self.loss_ema:.3f})")
                self.loss_ema = loss if self.loss_ema is None else 0.95 * self.loss_ema + 0.05 * loss
            if level is not None and step > self.cfg.swav.freeze_prototypes_steps and math.isfinite(loss):
                self.collapse_run = self.collapse_run + 1 if loss > 0.9 * level else 0
                if self.collapse_run >= self.cfg.log.collapse_patience and not self.collapse_warned:
                    self.collapse_warned = True
                    self.message(
                        f"WARNING: the loss has stayed near ln K = {level:.2f} for {self.collapse_run} steps: "
                        "the model may have collapsed. Try swav.epsilon=0.03, a longer "
                        "swav.freeze_prototypes_steps, model.head_bn=false, a later swav.queue_start_step, "
                        "or fewer prototypes than the batch can fill."
                    )


def write_diagnostic(path: Path, step: int, loss: float, facts: dict, keys, env: DistEnv) -> None:
    path.parent.mkdir(exist_ok=True)
    diag = {"step": step, "rank": env.rank, "loss": loss, **facts, "keys": list(keys)}
    path.write_text(json.dumps(diag))
