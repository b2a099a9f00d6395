"""The one training loop: set-up, then ``train_step`` per batch (forward and backward by the method
object, one verdict across ranks, LARC step), health, metrics, checkpoints. Any method plugs in
(train/methods/: SwAV for ``pretrain``, the student of ``distill``).

``pretrain(cfg, run_dir)`` starts a SwAV run; ``pretrain(..., resume=True)`` continues the run in
``run_dir`` from its latest checkpoint with the same step, LR, data order, method state (SwAV's queue)
and optimiser state. ``train(cfg, run_dir, Builder)`` does the same for any method builder. The same
code runs in one process or under torchrun (DDP or FSDP2, see train/parallel.py; FSDP runs write
sharded DCP checkpoints, see train/checkpoint.py and train/sharded.py). The run directory's files
are named and written by openseer/rundir.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import Config, config_from_dict, to_dict
from ..data.batches import Batch, count_reasons, data_state, iterate_batches, prepare_stream, steps_per_epoch
from ..data.collection import open_collection
from ..data.decode import DataError
from ..data.index import prepare_decode_cache
from ..data.takedown import folder_provenance, record_provenance
from ..device import resolve_device
from ..rundir import (  # noqa: F401  (RunError, resume_config: callers import them from here)
    BAD_IMAGES,
    RunError,
    append_bad_images,
    check_extension,
    config_diff,
    prepare_run_dir,
    resume_config,
    rewrite_config,
    truncate_metrics,
    write_init,
    write_schedule,
)
from . import faults
from .checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, save_checkpoint
from .distributed import (
    DistEnv,
    all_reduce_scalar,
    check_dist,
    cuda_index,
    env_from_os,
    init_distributed,
    on_main,
)
from .hardware import resolve_auto
from .health import Health
from .methods.swav import SwAVTraining
from .metrics import PHASES, MetricsLog, Window
from .optim import LARC, build_optimizer, extend_schedule, peak_lr
from .parallel import is_sharded, prepare_model
from .preflight import advice, fit_batch, image_short_side, reached_lr, steps_advice
from .sharded import restore_state, save_sharded
from .step import Run, StepStats, train_step

__all__ = ["RunError", "TrainState", "pretrain", "resume_config", "schedule", "train"]




def schedule(cfg: Config, n_images: int, world: int) -> dict:
    """Global batch, per-rank batch, LR and schedule length as explicit functions of the world size."""
    gb = cfg.data.batch_size
    if gb % world:
        raise RunError(f"data.batch_size={gb} is the GLOBAL batch and must be divisible by the world size {world}")
    spe = steps_per_epoch(n_images, gb)
    return {
        "world_size": world,
        "global_batch": gb,
        "batch_per_rank": gb // world,
        "steps_per_epoch": spe,
        "total_steps": max(1, int(round(cfg.optim.epochs * spe))),
        "peak_lr": peak_lr(cfg.optim.base_lr, gb),
        "n_images": n_images,
        "minutes": cfg.optim.minutes,
    }


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


@dataclass
class TrainState:
    """What a checkpoint saves and a resume restores (as open_clip's TrainState): the model as the
    loop runs it (wrapped or not), the optimiser, the method object (its own state, e.g. SwAV's queue,
    through ``state_dict``/``load_state_dict``: the loop does not know what is in it), the config,
    schedule and counters."""

    model: nn.Module
    optimizer: LARC
    method: Any
    cfg: Config
    sched: dict
    counters: dict
    env: DistEnv

    def state_dict(self, step: int, data: dict | None = None) -> dict:
        """Everything needed to continue bit for bit. ``data`` is the stream position of tar-shard
        sources (data/stream_batches.py), gathered from all ranks. Collective under torchrun."""
        state = {
            "format": "openseer.pretrain.v1",
            "step": step,
            "model": _unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "config": to_dict(self.cfg),
            "schedule": self.sched,
            "counters": self.counters,
            "rng": {"torch": torch.get_rng_state()},
        }
        if data is not None:
            state["data"] = data
        if self.method is not None:
            state.update(self.method.state_dict())  # top-level entries (SwAV: "queue"), keys as before
        return state

    def load_state_dict(self, state: dict, path: Path) -> None:
        """Model, optimiser, RNG and the method's own state from a checkpoint (whole or sharded)."""
        net = _unwrap(self.model)
        if "dcp" in state or is_sharded(net):  # sharded checkpoint, or whole tensors into FSDP shards
            restore_state(state, net, self.optimizer, path)
        else:
            try:
                net.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
            except (RuntimeError, KeyError, ValueError) as e:
                first = str(e).strip().splitlines()
                raise CheckpointError(f"checkpoint {path} does not fit this model/config: "
                                      f"{first[1] if len(first) > 1 else first[0]}") from None
        if "rng" in state:
            torch.set_rng_state(state["rng"]["torch"])
        if self.method is not None:
            self.method.load_state_dict(state, path)


class _StopRequest:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and exits cleanly."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _announce_stop(log: MetricsLog, cfg: Config, step: int, signum: int | None, signalled: bool,
                   time_up: bool) -> bool:
    """Say why the loop ends at ``step`` (a stop signal, here or on a peer rank, or the time budget);
    False when it goes on."""
    if signalled:
        who = signal.Signals(signum).name if signum else "peer"
        log.message(f"openseer: {who} received: checkpointing at step {step} and exiting")
        return True
    if time_up:
        log.message(f"openseer: time budget of {cfg.optim.minutes:g} minutes reached at step {step}")
        return True
    return False


def pretrain(cfg: Config, run_dir: str | Path, resume: bool | str = False, max_steps: int | None = None) -> dict:
    """Run (or continue) SwAV pretraining; returns a summary dict (final step, loss, counters).
    Under torchrun it starts the process group, or uses the one already started, and leaves it open
    (a later call in the same process reuses it); the process's owner closes it with
    ``close_distributed()`` when done, as ``openseer pretrain`` does."""
    return train(cfg, run_dir, SwAVTraining, resume=resume, max_steps=max_steps)


Builder = Callable[[Config, DistEnv, torch.device], Any]  # a method's builder class (train/methods/__init__.py)


def train(cfg: Config, run_dir: str | Path, builder: Builder, resume: bool | str = False,
          max_steps: int | None = None) -> dict:
    """Run (or continue) the method that ``builder`` builds (train/methods/__init__.py); a summary dict
    (final step, counters, ``preempted``: the stop signal's name when one ended the run, else None).

    Set-up (``_setup``), then a loop over ``train_step(run, batch)`` (train/step.py) with health
    (train/health.py), metrics (train/metrics.py) and checkpoints each in a small piece."""
    run_dir = Path(run_dir)
    s = _setup(cfg, run_dir, builder, resume, max_steps)
    run, log, health, batches = s.run, s.log, s.health, s.batches
    cfg, env = run.cfg, run.env
    window = Window()
    monitor_result: dict = {}
    last_ckpt_step = run.step
    time_up = s.time_up
    preempted = None
    stop_request = _StopRequest()
    run.stop_requested = lambda: stop_request.signal is not None
    # the first step of a compiled model builds its graphs: announced, timed and kept out of the budget
    compiling = bool(cfg.model.compile) or getattr(run.method, "first_step_compiles", False)
    budget_checked = not (cfg.optim.minutes and env.is_main) or s.steps_warned
    first: tuple[int, float] | None = None
    t_wait = time.perf_counter()
    try:
        stop_request.__enter__()
        for batch in batches:
            batch: Batch
            data_s = time.perf_counter() - t_wait
            _count_bad_images(batch, run, s.run_dir)
            try:
                if compiling:
                    stats = _compile_step(run, batch, log)
                else:
                    stats = train_step(run, batch)
            except Exception:
                if run.step == s.start:  # the first step failed: a refused start leaves nothing behind
                    s.undo()
                raise
            compiling = False
            step = run.step
            run.counters["images_seen"] += stats.images
            run.counters["train_seconds"] = round(stats.spent_s, 3)
            health.after_step(stats, run.method, batch.keys)
            window.add(stats, data_s)
            log.tick(stats.spent_s, step, stats.loss)
            time_up = bool(run.budget_s) and stats.spent_s >= run.budget_s
            if first is None:
                first = (step, stats.spent_s)
            elif not budget_checked and step - first[0] >= 2:  # the step time is known: what the clock allows
                budget_checked = True
                _check_budget(run, s, first, log)
            last = step == s.stop or time_up
            if cfg.monitor.every and cfg.monitor.data and (step % cfg.monitor.every == 0 or last):
                monitor_result = _run_monitor(s.net, cfg, run.device, env)
            if step % cfg.log.every == 0 or last:
                _log_row(window, stats, run, health, log, monitor_result)
                window, monitor_result = Window(), {}
            if step % cfg.checkpoint.every == 0 and not last:
                window = _flush_health(window, health)  # the counters in the checkpoint are up to date
                _checkpoint(s.state, s.run_dir, step, log, data=data_state(batches))
                last_ckpt_step = step
            signum = stop_request.signal if stats.stop_signalled else None
            if _announce_stop(log, cfg, step, signum, stats.stop_signalled, time_up):
                if stats.stop_signalled:
                    preempted = signal.Signals(signum).name if signum else "a stop signal on another rank"
                break
            t_wait = time.perf_counter()
    except DataError:  # no batch for the first step (e.g. no usable image): a refused start leaves nothing behind
        if run.step == s.start:
            s.undo()
        raise
    finally:
        stop_request.__exit__()
        log.close()
        if hasattr(batches, "close"):  # loader workers stop now (a generator or StreamBatches)
            batches.close()
    _flush_health(window, health)
    step = run.step
    if step != last_ckpt_step or not list_checkpoints(s.run_dir):
        _checkpoint(s.state, s.run_dir, step, log, data=data_state(batches))
    counters = run.counters
    if counters["bad_images"] and env.is_main:
        print(f"openseer: skipped unreadable images: {counters['bad_images']} "
              f"(listed in {s.run_dir / BAD_IMAGES})")
    summary = {"step": step, "total_steps": run.sched["total_steps"], "counters": counters,
               "run_dir": str(s.run_dir), "preempted": preempted, "time_budget_reached": time_up,
               "complete": s.complete or (not preempted and (time_up or step >= run.sched["total_steps"])),
               "compile_seconds": counters.get("compile_seconds", 0.0)}
    if env.world_size > 1:
        dist.barrier()
    return summary


@dataclass
class _SetUp:
    run: Run
    state: TrainState
    run_dir: Path
    net: nn.Module
    log: MetricsLog
    health: Health
    batches: object
    stop: int
    time_up: bool
    start: int = 0  # the step this process started at
    complete: bool = False  # a resumed run that had nothing left to do
    fresh: _FreshStart | None = None  # a new run's files, removed again if its start is refused
    steps_warned: bool = False  # the pre-training advice already said warm-up or freeze outlast the run

    def undo(self) -> None:
        if self.fresh is not None:
            self.log.close()
            self.fresh.undo()
            self.fresh = None  # once


class _FreshStart:
    """What a new run wrote into its directory, so a start refused during set-up (or at its first
    step) can take it away again: the same command then starts cleanly, instead of being told that
    the folder already holds a run that has no checkpoint to resume (rank 0 only)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.existed = run_dir.is_dir()
        self.before = set(os.listdir(run_dir)) if self.existed else set()

    def undo(self) -> None:
        if not self.run_dir.is_dir():
            return
        for name in os.listdir(self.run_dir):
            if name not in self.before:
                path = self.run_dir / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        if not self.existed:
            try:
                self.run_dir.rmdir()
            except OSError:
                pass


def _setup(cfg: Config, run_dir: Path, builder: Builder, resume: bool | str, max_steps: int | None) -> _SetUp:
    """Device, process group, data, model, method, optimiser and (on resume) their saved state."""
    device = resolve_device(cfg.device, option="device=")
    cfg, auto_notes = resolve_auto(cfg, device)  # the saved config says what ran
    if cfg.optim.precision == "fp16" and device.type != "cuda":
        raise RunError("optim.precision=fp16 needs CUDA (a grad scaler on GPU); use bf16 or fp32 on CPU")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    check_dist(cfg, env_from_os(), device.type)  # before any collective: a bad set-up cannot hang
    env = init_distributed(cfg.dist.backend, device.type)
    if device.type == "cuda":
        device = torch.device("cuda", cuda_index(env))
        torch.backends.cudnn.benchmark = True  # crop sizes are fixed: let cuDNN pick each conv's fastest kernel
    if resume != "auto":  # --auto-resume compares configs once the batch is fitted to the pile (below)
        prepare_run_dir(run_dir, cfg, resume, env.is_main, write=False)  # refuse a bad --out before any work
    build = None
    if getattr(getattr(builder, "func", builder), "brings_images", False):  # finetune's labelled images (a partial)
        build = builder(cfg, env, device)
        source = build.collection()
    else:
        source = open_collection(cfg.data.source, limit=cfg.data.limit, data_cfg=cfg.data,
                                 channels=cfg.model.in_chans)
        # data.decode_cache: small copies of large images, kept in the pile's index, read instead (data/index.py)
        cfg, cache_note = prepare_decode_cache(cfg, source, env.rank, env.world_size, progress=cfg.log.progress)
        auto_notes = [*auto_notes, cache_note]
    batch_note = ""
    if not resume or resume == "auto":  # a resumed run keeps the batch its config records
        fitted, batch_note = fit_batch(cfg, len(source), env.world_size)
        if fitted is not cfg:
            cfg, build = fitted, None
    if build is None:
        build = builder(cfg, env, device)  # what can fail early does (a teacher that does not load)
    sched = schedule(cfg, len(source), env.world_size)

    torch.manual_seed(cfg.seed)
    model = build.build_model()
    # written only now that the data and the model are known to work
    fresh = _FreshStart(run_dir) if env.is_main and resume is not True else None
    resume = on_main(env, prepare_run_dir, run_dir, cfg, resume, env.is_main)  # rank 0 decides, all follow
    if resume:
        fresh = None
    try:
        return _setup_run(cfg, run_dir, build, source, sched, model, env, device, resume, max_steps,
                          auto_notes, batch_note, fresh)
    except BaseException:
        if fresh is not None:  # a refused start leaves nothing that blocks the same command again
            fresh.undo()
        raise


def _setup_run(cfg: Config, run_dir: Path, build: Any, source: Any, sched: dict, model: nn.Module, env: DistEnv,
               device: torch.device, resume: bool, max_steps: int | None, auto_notes: list[str], batch_note: str,
               fresh: _FreshStart | None) -> _SetUp:
    """The rest of the set-up, once the run directory is decided (``_setup`` undoes a new run's files
    when anything here fails)."""
    if not resume and hasattr(build, "start_from"):  # model.init (pretrain --init): a new run's starting weights
        build.start_from(model, source)
        if env.is_main and getattr(build, "init_record", None):
            write_init(run_dir, build.init_record)  # what --init loaded and what started fresh (init.json)
            rewrite_config(run_dir, cfg)  # config.yaml with model.init_sha256 / init_loaded / init_fresh
    model = prepare_model(model, cfg, env, device)  # one process: unchanged; else SyncBN, DDP or FSDP2
    net = _unwrap(model)
    if cfg.model.compile:
        # in place (state-dict keys and checkpoints unchanged); static shapes: one graph per crop resolution
        net.backbone.compile(dynamic=False)
    optimizer = build_optimizer(net, cfg)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.optim.precision)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    method = faults.from_env(build.build_method(model, autocast))  # tests may wrap it to inject faults

    step = 0
    counters = {"bad_images": {}, "skipped_steps": 0, "images_seen": 0}
    train_state = TrainState(model, optimizer, method, cfg, sched, counters, env)
    state = _resume(train_state, run_dir) if resume else None
    spent = float(counters.get("train_seconds", 0.0))  # seconds of training so far (resumes too)
    extended = None
    if state is not None:
        step = int(state["step"])
        before = config_from_dict(state["config"])
        extended = extend_schedule(sched, state.get("schedule") or {}, before.optim, cfg.optim, step, spent)
        if extended and env.is_main:
            rewrite_config(run_dir, cfg)  # the run's config says how long it now is
    stop = sched["total_steps"] if max_steps is None else min(max_steps, sched["total_steps"])
    budget_s = cfg.optim.minutes * 60
    time_up = bool(budget_s) and spent >= budget_s
    if time_up:
        stop = step  # a finished time-budgeted run: nothing left to do
    complete = bool(resume) and step >= stop and (time_up or stop >= sched["total_steps"])
    steps_warned = False  # warm-up or freeze already said to outlast the run (not said again by the clock check)

    log = MetricsLog(run_dir, cfg, step, stop, env.is_main, label=build.name)
    if env.is_main:
        reach = reached_lr(cfg, sched, stop)
        log.message(f"openseer: {build.describe()}{source.description}; "
                    f"{_plan(cfg, sched, step, stop, resume, reach)} -> {run_dir}")
        for note in [*auto_notes, batch_note]:
            if note:
                log.message(f"openseer: {note}")
        if extended:
            log.message(f"openseer: {_extension_line(extended)}")
        if complete:
            log.message(f"openseer: {_complete_line(cfg, sched, step, time_up, build.name, run_dir)}")
        elif not resume:
            warned = advice(cfg, sched, step, stop, image_short_side(source))
            for warning in warned:
                log.message(f"openseer: {warning}")
            steps_warned = any("outlasts" in w for w in warned)
        write_schedule(run_dir, sched)
    health = Health(cfg, run_dir, env, counters, log.message, collapse_loss=method.collapse_loss)

    batches = iterate_batches(source, cfg, env.rank, env.world_size, step, stop)
    prepare_stream(batches, run_dir, state if resume else None, env.is_main)  # tar shards: position, provenance
    if env.is_main and source.kind == "files":  # folders: what was read, deny-list in force
        record_provenance(run_dir, folder_provenance(run_dir, source), step, source.deny)
    run = Run(cfg=cfg, device=device, env=env, sched=sched, method=method, optimizer=optimizer,
              scaler=torch.amp.GradScaler("cuda") if cfg.optim.precision == "fp16" else None,
              step=step, counters=counters, spent_s=spent, t_loop=time.perf_counter() - spent)  # the run's clock
    return _SetUp(run, train_state, run_dir, net, log, health, batches, stop, time_up, start=step,
                  complete=complete, fresh=fresh, steps_warned=steps_warned)


def _resume(train_state: TrainState, run_dir: Path) -> dict:
    """Restore the latest checkpoint of ``run_dir`` into ``train_state`` (it must have the same config,
    resumable keys aside, and may only be longer); drop the metrics logged after it. Returns the
    checkpoint's (shallow) state."""
    path, state = latest_checkpoint(run_dir, shallow=True)  # .dcp: tensors are loaded by load_state_dict
    saved = config_from_dict(state["config"])
    diff = config_diff(saved, train_state.cfg)
    if diff:
        raise CheckpointError(f"checkpoint {path} was trained with a different config ({diff})")
    check_extension(saved, train_state.cfg)
    train_state.load_state_dict(state, path)
    train_state.counters.update(state.get("counters", {}))
    if train_state.env.is_main:
        truncate_metrics(run_dir, int(state["step"]))
    return state


def _plan(cfg: Config, sched: dict, step: int, stop: int, resume: bool, reach: float | None = None) -> str:
    """The run's first line after the data: world, batch, LR, length, where it starts and stops."""
    budget = f" or {cfg.optim.minutes:g} minutes of training, whichever comes first" if cfg.optim.minutes else ""
    peak = sched["peak_lr"]
    lr = (f"peak LR {peak:.4g}" if reach is None or reach >= peak
          else f"LR up to {reach:.4g} (the planned peak {peak:.4g} comes after the warm-up, past the run's end)")
    return (f"world {sched['world_size']}, global batch {sched['global_batch']} ({sched['batch_per_rank']}/rank), "
            f"{lr}, {sched['total_steps']} steps ({sched['steps_per_epoch']}/epoch)"
            f"{budget}, {'resuming at step ' + str(step) if resume else 'from model.init' if cfg.model.init else 'from scratch'}"
            f"{', stopping at step ' + str(stop) if stop < sched['total_steps'] else ''}")


def _extension_line(record: dict) -> str:
    """What a resume that makes the run longer changed (also in schedule.json's ``extended``)."""
    a, b = record["from"], record["to"]
    what = ", ".join(f"optim.{k} {a[k]:g} -> {b[k]:g}" for k in ("epochs", "minutes") if a[k] != b[k])
    ramp = (f"; the LR ramps from {record['lr_before']:.4g} to {record['lr_planned']:.4g} over "
            f"{record['rewarm_steps']} step(s), then follows the longer cosine" if record["rewarm_steps"]
            else f"; the LR goes on at {record['lr_planned']:.4g} along the longer schedule")
    return (f"extending the run at step {record['at_step']} ({what}; {b['total_steps']} steps planned){ramp} "
            "(recorded in config.yaml and schedule.json)")


def _complete_line(cfg: Config, sched: dict, step: int, time_up: bool, command: str, run_dir: Path) -> str:
    """A resume of a run with nothing left to do: say so, and how to make it longer."""
    if time_up:
        why = f"its time budget of {cfg.optim.minutes:g} minutes is spent"
        longer = f"optim.minutes={2 * cfg.optim.minutes:g}"
    else:
        why = f"all {sched['total_steps']} steps are done"
        longer = f"optim.epochs={2 * cfg.optim.epochs:g}"
    return (f"the run is complete at step {step} ({why}); nothing to train. To train longer: "
            f"openseer {command} --resume {run_dir} {longer}")


def _check_budget(run: Run, s: _SetUp, first: tuple[int, float], log: MetricsLog) -> None:
    """Under a time budget, once the step time is known (``first``: step and clock after the first
    step, which may have compiled): the warm-up or freeze that the clock cuts short."""
    rate = (run.spent_s - first[1]) / max(run.step - first[0], 1)  # seconds per step
    if rate <= 0:
        return
    reachable = run.step + int(max(run.budget_s - run.spent_s, 0.0) / rate)
    if reachable >= s.stop:  # the step schedule ends first: said before training
        return
    how = f" (the {run.cfg.optim.minutes:g}-minute budget at {rate:.2g} s/step)"
    for warning in steps_advice(run.cfg, run.sched, reachable, how):
        log.message(f"openseer: {warning}")


def _compile_step(run: Run, batch: Batch, log: MetricsLog) -> StepStats:
    """The first step of a compiled model (it builds the graphs): announced, timed and kept off the
    run's clock, so ``optim.minutes`` counts training only; the time goes to
    ``counters['compile_seconds']`` and the summary."""
    t0 = time.perf_counter()
    with log.compiling():
        stats = train_step(run, batch)
    took = time.perf_counter() - t0
    run.t_loop += took  # the clock did not run while the graphs were built
    run.spent_s = max(run.spent_s - took, 0.0)
    stats.spent_s = run.spent_s
    run.counters["compile_seconds"] = round(run.counters.get("compile_seconds", 0.0) + took, 3)
    return stats


def _count_bad_images(batch: Batch, run: Run, run_dir: Path) -> None:
    if batch.bad:
        bad_images = run.counters["bad_images"]
        for reason, n in count_reasons(batch.bad).items():
            bad_images[reason] = bad_images.get(reason, 0) + n
        if run.env.is_main:
            append_bad_images(run_dir, batch.bad)


def _flush_health(window: Window, health: Health) -> Window:
    """Run the spike/collapse checks over the window's losses so far (one wait for the device)."""
    if window.history:
        _, history = window.read()
        health.observe(history)
        window.history = []
    return window


def _log_row(window: Window, stats: StepStats, run: Run, health: Health, log: MetricsLog, monitor: dict) -> None:
    """One metrics row for the window that ends at this step (all ranks: the loss is averaged); the
    method adds its own columns (``row``), e.g. SwAV's prototypes in use."""
    means, history = window.read()
    health.observe(history)
    step = run.step
    counters = run.counters
    row = {
        "step": step,
        "epoch": round(step / run.sched["steps_per_epoch"], 4),
        "loss": all_reduce_scalar(means["loss"]),
        "lr": stats.lr,
        "imgs_per_s": means["imgs_per_s"],
        "data_s": means["data_s"],
        "step_s": means["step_s"],
        **{f"{p}_s": means[f"{p}_s"] for p in PHASES},
        **run.method.row(means),
        "skipped_steps": counters["skipped_steps"],
        "loss_spikes": counters["loss_spikes"],
        "bad_images": sum(counters["bad_images"].values()),
    }
    if run.method.collapse_loss is not None:
        row["collapse_warning"] = health.collapse_warned
    row.update(monitor)
    log.write(row)


def _checkpoint(state: TrainState, run_dir: Path, step: int, log: MetricsLog, data: dict | None = None) -> None:
    """Save the training state at ``step``; a failed write is a warning (training goes on)."""
    saved = state.state_dict(step, data)  # every rank: the method's state may gather across ranks
    net = _unwrap(state.model)
    try:
        if is_sharded(net):  # FSDP: every rank writes its shards (DCP)
            save_sharded(saved, net, state.optimizer, run_dir, step, state.cfg.checkpoint.keep)
        elif state.env.is_main:
            save_checkpoint(saved, run_dir, step, state.cfg.checkpoint.keep)
    except CheckpointError as e:
        log.message(f"WARNING: {e}. Training continues; the next checkpoint will be tried at the usual interval.")


def _run_monitor(net: nn.Module, cfg: Config, device: torch.device, env: DistEnv) -> dict:
    """kNN accuracy of the current backbone on labelled data (rank 0), e.g. monitor.data=fashion-mnist."""
    if not env.is_main:
        return {}
    from ..eval.monitor import knn_monitor

    was_training = net.backbone.training
    net.backbone.eval()
    try:
        result = knn_monitor(net.backbone, cfg, device)
    finally:
        net.backbone.train(was_training)
    return {f"monitor_{k}": v for k, v in result.items()}
