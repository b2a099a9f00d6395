"""``openseer doctor RUN_DIR``: check a run directory and say what is wrong and how to recover."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError
from ..model.checkpoint_file import CheckpointError, load_checkpoint
from ..rundir import (
    BAD_IMAGES,
    CONFIG,
    DIAGNOSTICS,
    METRICS,
    PROVENANCE,
    checkpoint_step,
    leftover_temporaries,
    list_checkpoints,
    load_run_config,
)


@dataclass
class Finding:
    level: str  # ok | warn | error
    what: str
    fix: str = ""

    def line(self) -> str:
        tag = {"ok": "ok   ", "warn": "WARN ", "error": "ERROR"}[self.level]
        return f"{tag} {self.what}" + (f"\n      -> {self.fix}" if self.fix else "")


def diagnose(run_dir: str | Path) -> list[Finding]:
    """Every check on a run directory, as findings (never raises for a broken run)."""
    run = Path(run_dir)
    out: list[Finding] = []
    if not run.is_dir():
        return [Finding("error", f"{run} is not a directory", "pass the --out folder of a pretraining run")]

    cfg = None
    try:
        cfg = load_run_config(run)
        out.append(Finding("ok", f"{CONFIG} loads (recipe {cfg.recipe}, backbone {cfg.model.arch})"))
    except (ConfigError, OSError) as e:
        out.append(Finding("error", f"{CONFIG}: {e}", f"restore {CONFIG} from a checkpoint's 'config' entry"))

    ckpts = list_checkpoints(run)
    last_state = None
    for t in leftover_temporaries(run):
        out.append(Finding("warn", f"{t.name}: an unfinished checkpoint write (the process died while saving)",
                           f"safe to delete: rm {t}"))
    if not ckpts:
        out.append(Finding("error", "no checkpoint", "the run cannot be resumed; start it again with --out"))
    good_step = None
    for path in reversed(ckpts):
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            out.append(Finding("error", str(e), f"delete {path}; --resume will use the previous checkpoint"))
            continue
        step = int(state.get("step", -1))
        expected = checkpoint_step(path)
        missing = [k for k in ("model", "optimizer", "step", "config") if k not in state]
        if missing:
            out.append(Finding("error", f"{path.name} lacks {', '.join(missing)}", f"delete {path}"))
        elif step != expected:
            out.append(Finding("error", f"{path.name} holds step {step}, not {expected}", f"delete {path}"))
        else:
            bad = [k for k, v in state["model"].items() if v.is_floating_point() and not v.isfinite().all()]
            if bad:
                out.append(Finding("error", f"{path.name} has non-finite weights in {bad[0]}",
                                   f"delete {path} and resume from an earlier checkpoint"))
            else:
                out.append(Finding("ok", f"{path.name} loads safely (weights_only) at step {step}"))
                if good_step is None:
                    good_step, last_state = step, state

    metrics = run / METRICS
    if metrics.is_file() and metrics.stat().st_size:
        last = None
        for line in metrics.read_text().splitlines():
            try:
                last = json.loads(line)
            except json.JSONDecodeError:
                out.append(Finding("warn", f"{METRICS} has a torn line (written while the process died)",
                                   "harmless; new lines are appended after it"))
        if last:
            loss = last.get("loss", float("nan"))
            msg = f"last metrics: step {last.get('step')}, loss {loss:.4f}, lr {last.get('lr', 0):.4g}"
            if not math.isfinite(loss):
                out.append(Finding("error", msg + " (non-finite)", "lower optim.base_lr or use optim.precision=fp32"))
            elif last.get("collapse_warning") or (last.get("ln_k") and loss > 0.9 * last["ln_k"]):
                out.append(Finding("warn", msg + f" (near ln K = {last.get('ln_k', 0):.2f}: collapse?)",
                                   "see docs/method.md §5.7: swav.epsilon=0.03, longer freeze, model.head_bn=false"))
            else:
                out.append(Finding("ok", msg))
            if good_step is not None and last.get("step", 0) > good_step:
                out.append(Finding("ok", f"resuming repeats steps {good_step + 1}..{last['step']} "
                                         f"(logged after the last checkpoint); this is expected"))
    else:
        out.append(Finding("warn", f"no {METRICS} yet", "the run stopped before its first logged step"))

    diag = run / DIAGNOSTICS
    if diag.is_dir() and any(diag.iterdir()):
        out.append(Finding("warn", f"{len(list(diag.iterdir()))} skipped non-finite steps ({DIAGNOSTICS}/)",
                           "inspect the JSON files: scores, assignments and the batch's sample keys"))
    bad_images = run / BAD_IMAGES
    if bad_images.is_file():
        n = len(bad_images.read_text().splitlines())
        out.append(Finding("ok", f"{n} unreadable images were skipped ({BAD_IMAGES})"))
    denylist = run / PROVENANCE
    if denylist.is_file():
        out.append(Finding("ok", f"data provenance recorded: {denylist.name}"))
    else:
        out.append(Finding("ok", "no deny-list recorded (the run read no tar shards)"))
    if last_state is not None:
        command = "distill" if cfg is not None and cfg.distill.teacher else "pretrain"
        out.append(_where_it_stopped(last_state, cfg, f"openseer {command} --resume {run}"))
        out.append(Finding("ok", f"resume with: openseer {command} --resume {run}"))
    return out


def _where_it_stopped(state: dict, cfg, resume: str) -> Finding:
    """Whether the latest good checkpoint ends the run (its steps or its time budget) or there is more
    to do; a finished run is told how to make it longer (``resume``: the command that continues it)."""
    step = int(state["step"])
    total = (state.get("schedule") or {}).get("total_steps")
    seconds = float((state.get("counters") or {}).get("train_seconds", 0.0))
    minutes = cfg.optim.minutes if cfg is not None else 0
    if minutes and seconds >= minutes * 60:
        return Finding("ok", f"finished: stopped on its time budget of {minutes:g} minutes at step {step}",
                       f"a plain resume does nothing; to train longer, resume with a larger optim.minutes: "
                       f"{resume} optim.minutes={2 * minutes:g} (the schedule continues from where it stands)")
    if total and step >= total:
        epochs = cfg.optim.epochs if cfg is not None else 1
        return Finding("ok", f"finished: all {total} steps done",
                       f"to train longer, resume with a larger optim.epochs: {resume} optim.epochs={2 * epochs:g} "
                       "(the schedule continues from where it stands)")
    return Finding("ok", f"stopped at step {step}" + (f" of {total}" if total else "") + ": resuming continues it")


def run_doctor(run_dir: str | Path) -> int:
    """Print the findings; exit code 1 when any is an error."""
    findings = diagnose(run_dir)
    for f in findings:
        print(f.line())
    return 1 if any(f.level == "error" for f in findings) else 0
