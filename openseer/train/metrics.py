"""What a run reports: metrics.jsonl (one JSON object per logged step), TensorBoard scalars, and the
progress line (openseer/progress.py), plus ``Window``: a log window's sums kept on the device, so
the steps between two log steps never wait for it; ``Window.read()`` waits once."""

from __future__ import annotations

import json
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from ..config import Config
from ..progress import Progress, format_seconds, progress
from ..rundir import METRICS, TENSORBOARD
from .step import StepStats

PHASES = ("forward", "sinkhorn", "backward", "optimizer")  # always in a row (0 when a method has none)


class Window:
    """Sums over the steps of one log window: the loss of good steps, the method's statistics and
    each step's loss for the health checks, all on the device until ``read``."""

    def __init__(self):
        self.t_start = time.perf_counter()
        self.steps, self.images, self.good = 0, 0, 0
        self.data_s = 0.0
        self.timed, self.phases = 0, dict.fromkeys(PHASES, 0.0)
        self.loss_sum: torch.Tensor | None = None
        self.stat_sums: dict[str, torch.Tensor] = {}
        self.history: list[tuple[int, bool, torch.Tensor]] = []  # (step done, bad, loss) for health

    def add(self, s: StepStats, data_s: float) -> None:
        self.steps += 1
        self.images += s.images
        self.data_s += data_s
        loss = s.loss.detach().double()
        if not s.bad:
            self.good += 1
            self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        for k, v in s.stats.items():
            v = v.detach().double()
            self.stat_sums[k] = v if k not in self.stat_sums else self.stat_sums[k] + v
        self.history.append((s.step + 1, s.bad, loss))
        if s.phases is not None:
            self.timed += 1
            for k, v in s.phases.items():
                self.phases[k] = self.phases.get(k, 0.0) + v

    def read(self) -> tuple[dict, list[tuple[int, bool, float]]]:
        """Means of the window (one wait for the device) and the per-step losses for health checks."""
        names = list(self.stat_sums)
        parts = [self.loss_sum if self.loss_sum is not None else torch.zeros((), dtype=torch.float64)]
        parts += [self.stat_sums[k] for k in names] + [loss for _, _, loss in self.history]
        device = parts[-1].device if self.history else parts[0].device
        values = torch.stack([p.to(device) for p in parts]).tolist() if parts else []
        loss_sum, stat_values, losses = values[0], values[1:1 + len(names)], values[1 + len(names):]
        elapsed = time.perf_counter() - self.t_start
        n = max(self.steps, 1)
        means = {
            "loss": loss_sum / self.good if self.good else float("nan"),
            "imgs_per_s": self.images / max(elapsed, 1e-9),
            "data_s": self.data_s / n,
            "step_s": elapsed / n,
            **{f"{k}_s": v / max(self.timed, 1) for k, v in self.phases.items()},
            **{k: v / n for k, v in zip(names, stat_values)},
        }
        return means, [(step, bad, loss) for (step, bad, _), loss in zip(self.history, losses)]


class MetricsLog:
    """metrics.jsonl, TensorBoard scalars and the progress line (``log.progress=false``: none)."""

    def __init__(self, run_dir: Path, cfg: Config, start_step: int, stop_step: int, main: bool,
                 label: str = "pretrain"):
        self.main = main
        self.path = Path(run_dir) / METRICS
        self.tb = None
        self.bar: Progress | None = None
        self.by_time = cfg.optim.minutes > 0  # under a time budget the line counts seconds: steps are not known
        if not main:
            return
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / TENSORBOARD))
            except ImportError:
                warnings.warn("tensorboard is not installed: TensorBoard scalars are off", stacklevel=1)
        if cfg.log.progress:
            if self.by_time:
                self.bar = progress(label, round(cfg.optim.minutes * 60), "s")
            else:
                self.bar = progress(label, stop_step, "step", initial=start_step)

    def write(self, row: dict) -> None:
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"train/{k}", v, row["step"])
        if self.bar is not None:
            first = {"step": row["step"]} if self.by_time else {}
            rate = row["imgs_per_s"]
            self.bar.postfix(**first, loss=round(row["loss"], 3), img_s=round(rate) if rate >= 10 else round(rate, 2))

    def tick(self, spent_s: float, step: int | None = None, loss: torch.Tensor | None = None) -> None:
        """One step done: move the progress; the step and its loss go into the line whenever one is
        due (the first line included), so a person never waits for the first log row to see them."""
        if self.bar is None:
            return
        if step is not None and self.bar.due():
            values: dict = {"step": step} if self.by_time else {}
            if loss is not None:
                values["loss"] = round(float(loss.detach()), 3)
            self.bar.postfix(**values)
        if self.by_time:
            self.bar.set(round(spent_s))
        else:
            self.bar.update(1)

    def compiling(self):
        """Around the first step of a compiled backbone: announced, and left out of the rate, the ETA
        and the time budget (train/loop.py keeps it off the run's clock)."""
        left_out = "the rate, the ETA and the time budget (optim.minutes)"
        if self.bar is None:
            return self._compiling_said(left_out) if self.main else nullcontext()
        return self.bar.compiling(left_out=left_out)

    @contextmanager
    def _compiling_said(self, left_out: str):
        """The compile announced as plain messages (no progress line: ``log.progress=false``)."""
        self.message(f"openseer: compiling the model (torch.compile); the first step waits for it and is left "
                     f"out of {left_out}")
        t0 = time.perf_counter()
        yield
        self.message(f"openseer: compiled in {format_seconds(time.perf_counter() - t0)}")

    def message(self, text: str) -> None:
        if not self.main:
            return
        if self.bar is not None and self.bar.style == "bar":
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
