"""The SwAV training loop: set-up, then ``train_step`` per batch (forward, Sinkhorn targets, loss and
backward by the method object, one verdict across ranks, LARC step), health, metrics, checkpoints.

``pretrain(cfg, run_dir)`` starts a run; ``pretrain(..., resume=True)`` continues the run in
``run_dir`` from its latest checkpoint with the same step, LR, data order, queue and optimiser state.
The same code runs in one process or under torchrun (DDP or FSDP2, see train/parallel.py; FSDP
runs write sharded DCP checkpoints, see train/checkpoint.py and train/sharded.py).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..config import Config, ConfigError, config_from_dict, load_config, save_config, to_dict
from ..data.batches import Batch, count_reasons, data_state, iterate_batches, prepare_stream, steps_per_epoch
from ..data.collection import open_collection
from ..data.takedown import record_provenance
from ..device import resolve_device
from ..fileio import atomic_write_text
from ..model.swav import SwAV, SwAVMethod, SwAVQueue, build_swav, ln_k
from .checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, save_checkpoint
from .distributed import (
    DistEnv,
    all_reduce_scalar,
    check_dist,
    cuda_index,
    env_from_os,
    gather_cat,
    init_distributed,
    on_main,
)
from .hardware import resolve_auto
from .health import Health, RunError
from .metrics import PHASES, MetricsLog, Window
from .optim import build_optimizer, peak_lr
from .parallel import is_sharded, prepare_model
from .sharded import restore_state, save_sharded
from .step import Run, StepStats, train_step

__all__ = ["RunError", "pretrain", "resume_config", "schedule"]

# overrides that may change when a run is resumed; everything else must match the checkpoint
RESUMABLE_KEYS = ("checkpoint.", "log.", "data.num_workers", "monitor.", "threads", "device", "dist.backend",
                  "dist.strategy", "dist.fsdp_wrap", "dist.activation_checkpointing",
                  "model.compile", "model.pointwise_matmul",
                  "model.narrow_group_fp32")  # speed, not the math (tests/train/test_levers.py)


def check_writable(run_dir: Path) -> None:
    """Refuse an output directory we cannot write, before any training."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise RunError(f"cannot write to output directory {run_dir}: {e.strerror or e}") from None


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


def _unwrap(model) -> SwAV:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _state(step: int, model, optimizer, queue: SwAVQueue | None, cfg: Config, sched: dict, counters: dict,
           data: dict | None = None) -> dict:
    """Everything needed to continue bit for bit. The queue is gathered from all ranks; ``data`` is the
    stream position of tar-shard sources (data/batches.py's StreamBatches), gathered from all ranks."""
    net = _unwrap(model)
    state = {
        "format": "openseer.pretrain.v1",
        "step": step,
        "model": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "config": to_dict(cfg),
        "schedule": sched,
        "counters": counters,
        "rng": {"torch": torch.get_rng_state()},
    }
    if data is not None:
        state["data"] = data
    if queue is not None:
        # saved whole (all ranks' shares in rank order) so a run can resume on another world size
        world = dist.get_world_size() if dist.is_initialized() else 1
        # a ring buffer: every rank's write position is the same (same per-rank batch every step)
        state["queue"] = {"embeddings": gather_cat(queue.embeddings, dim=1), "filled": queue.n_filled * world,
                          "pos": queue.write_pos, "world_size": world}
    return state


def _restore(state: dict, model, optimizer, queue: SwAVQueue | None, env: DistEnv, path: Path) -> None:
    net = _unwrap(model)
    if "dcp" in state or is_sharded(net):  # sharded checkpoint, or whole tensors into FSDP shards
        restore_state(state, net, optimizer, path)
    else:
        try:
            net.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as e:
            first = str(e).strip().splitlines()
            raise CheckpointError(f"checkpoint {path} does not fit this model/config: "
                                  f"{first[1] if len(first) > 1 else first[0]}") from None
    if "rng" in state:
        torch.set_rng_state(state["rng"]["torch"])
    if queue is not None:
        saved = state.get("queue")
        if saved is None:
            raise CheckpointError(f"checkpoint {path} has no queue but swav.queue_length > 0")
        world = saved.get("world_size") or state.get("schedule", {}).get("world_size", 0)
        _restore_queue({**saved, "world_size": world}, queue, env, path)


def _restore_queue(saved: dict, queue: SwAVQueue, env: DistEnv, path: Path) -> None:
    """This rank's share of a saved queue. Same world size: the ring as it was (bit-exact resume).
    Another world size, or a checkpoint from before the ring buffer (no ``pos``: each rank's share
    stored newest first, shifted every step): every saved share is put oldest-first, the whole queue
    re-dealt, and writing starts over the oldest rows again, as the old queue would have dropped them."""
    full = saved["embeddings"]
    share = queue.length
    if full.shape[1] != share * env.world_size or full.shape[2] != queue.embeddings.shape[2]:
        raise CheckpointError(f"checkpoint {path} queue shape {tuple(full.shape)} does not fit swav.queue_length")
    filled = min(int(saved["filled"]) // env.world_size, share)
    saved_world = int(saved.get("world_size", 0))
    if "pos" in saved and saved_world == env.world_size:
        queue.load(full[:, env.rank * share:(env.rank + 1) * share], filled, int(saved["pos"]))
        return
    old_share = full.shape[1] // saved_world if saved_world else share
    parts = []
    for r in range(full.shape[1] // old_share):
        part = full[:, r * old_share:(r + 1) * old_share]
        parts.append(part.roll(-int(saved["pos"]), dims=1) if "pos" in saved else part.flip(1))
    oldest_first = torch.cat(parts, dim=1)
    queue.load(oldest_first[:, env.rank * share:(env.rank + 1) * share], filled, 0)


def _prepare_run_dir(run_dir: Path, cfg: Config, resume: bool | str, main: bool, write: bool = True) -> bool:
    """Create or check the run directory; returns whether to resume from a checkpoint.

    ``resume='auto'`` (``--auto-resume``, for torchrun restarts and job requeues) continues a run
    already in ``run_dir`` with the same config, or starts it when there is none yet.
    ``write=False`` only checks (nothing is created), so a bad ``--out`` is refused at once and a
    start that fails later (bad data, unknown backbone) leaves no half-made run behind.
    """
    has_config = (run_dir / "config.yaml").is_file()
    if resume == "auto":
        if has_config:
            saved = load_config(run_dir / "config.yaml")
            diff = _config_diff(saved, cfg)
            if diff:
                raise RunError(f"{run_dir} holds a run with a different config ({diff}); "
                               f"choose another --out or resume it with --resume {run_dir}")
            if list_checkpoints(run_dir):
                if write:
                    check_writable(run_dir)
                return True
        if write:
            check_writable(run_dir)
            if main:
                save_config(cfg, run_dir / "config.yaml")
                (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        return False
    if resume:
        if not has_config:
            raise RunError(f"{run_dir} is not a run directory (no config.yaml); start a run with --out {run_dir}")
        if write:
            check_writable(run_dir)
        return True
    if run_dir.exists() and (has_config or list_checkpoints(run_dir)):
        raise RunError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out")
    if write:
        check_writable(run_dir)
        if main:
            save_config(cfg, run_dir / "config.yaml")
    return False


def _config_diff(a: Config, b: Config) -> str:
    """The first setting (outside the resumable keys) that differs between two configs, or ''."""
    da, db = to_dict(a), to_dict(b)
    for section, values in da.items():
        items = values.items() if isinstance(values, dict) else [(None, values)]
        for k, v in items:
            key = f"{section}.{k}" if k is not None else section
            other = db[section][k] if k is not None else db[section]
            if v != other and not key.startswith(RESUMABLE_KEYS) and key != "recipe":
                return f"{key}: {v!r} vs {other!r}"
    return ""


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics logged after the checkpoint we resume from (they will be logged again)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line torn by a crash
    atomic_write_text(path, "".join(x + "\n" for x in keep))  # a kill while rewriting loses nothing


def resume_config(run_dir: Path, overrides: list[str]) -> Config:
    """The saved config of a run, with only the overrides that may change on resume."""
    from ..config import merge, parse_override

    cfg = load_config(run_dir / "config.yaml")
    for text in overrides:
        key = text.split("=", 1)[0]
        if not key.startswith(RESUMABLE_KEYS):
            raise ConfigError(f"{key!r} cannot change when resuming (it would change the run); "
                              f"allowed on resume: {', '.join(RESUMABLE_KEYS)}")
        merge(cfg, parse_override(text))
    cfg.validate()
    return cfg


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
    ``close_distributed()`` when done, as ``openseer pretrain`` does.

    Set-up (``_setup``), then a loop over ``train_step(run, batch)`` (train/step.py) with health
    (train/health.py), metrics (train/metrics.py) and checkpoints each in a small piece."""
    run_dir = Path(run_dir)
    s = _setup(cfg, run_dir, resume, max_steps)
    run, log, health, batches = s.run, s.log, s.health, s.batches
    cfg, env = run.cfg, run.env
    window = Window()
    monitor_result: dict = {}
    last_ckpt_step = run.step
    time_up = s.time_up
    preempted = None
    stop_request = _StopRequest()
    run.stop_requested = lambda: stop_request.signal is not None
    compiling = cfg.model.compile
    t_wait = time.perf_counter()
    try:
        stop_request.__enter__()
        for batch in batches:
            batch: Batch
            data_s = time.perf_counter() - t_wait
            _count_bad_images(batch, run, s.run_dir)
            with log.compiling() if compiling else nullcontext():
                stats = train_step(run, batch)
            compiling = False
            step = run.step
            run.counters["images_seen"] += stats.images
            run.counters["train_seconds"] = round(stats.spent_s, 3)
            health.after_step(stats, run.method, batch.keys)
            window.add(stats, data_s)
            log.tick(stats.spent_s)
            time_up = bool(run.budget_s) and stats.spent_s >= run.budget_s
            last = step == s.stop or time_up
            if cfg.monitor.every and cfg.monitor.data and (step % cfg.monitor.every == 0 or last):
                monitor_result = _run_monitor(s.net, cfg, run.device, env)
            if step % cfg.log.every == 0 or last:
                _log_row(window, stats, run, health, log, monitor_result)
                window, monitor_result = Window(), {}
            if step % cfg.checkpoint.every == 0 and not last:
                window = _flush_health(window, health)  # the counters in the checkpoint are up to date
                _checkpoint(s.run_dir, step, s.model, run.optimizer, s.queue, cfg, run.sched, run.counters, env,
                            log, data=data_state(batches))
                last_ckpt_step = step
            if _announce_stop(log, cfg, step, stop_request.signal if stats.stop_signalled else None,
                              stats.stop_signalled, time_up):
                break
            t_wait = time.perf_counter()
    finally:
        stop_request.__exit__()
        log.close()
    _flush_health(window, health)
    step = run.step
    if step != last_ckpt_step or not list_checkpoints(s.run_dir):
        _checkpoint(s.run_dir, step, s.model, run.optimizer, s.queue, cfg, run.sched, run.counters, env, log,
                    data=data_state(batches))
    counters = run.counters
    if counters["bad_images"] and env.is_main:
        print(f"openseer: skipped unreadable images: {counters['bad_images']} "
              f"(listed in {s.run_dir / 'bad_images.txt'})")
    summary = {"step": step, "total_steps": run.sched["total_steps"], "counters": counters,
               "run_dir": str(s.run_dir), "preempted": preempted, "time_budget_reached": time_up}
    if env.world_size > 1:
        dist.barrier()
    return summary


@dataclass
class _SetUp:
    run: Run
    run_dir: Path
    model: torch.nn.Module
    net: SwAV
    queue: SwAVQueue | None
    log: MetricsLog
    health: Health
    batches: object
    stop: int
    time_up: bool


def _setup(cfg: Config, run_dir: Path, resume: bool | str, max_steps: int | None) -> _SetUp:
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
    _prepare_run_dir(run_dir, cfg, resume, env.is_main, write=False)  # refuse a bad --out before any work
    source = open_collection(cfg.data.source, limit=cfg.data.limit, data_cfg=cfg.data)
    sched = schedule(cfg, len(source), env.world_size)

    torch.manual_seed(cfg.seed)
    model = build_swav(cfg).to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    queue = None
    if cfg.swav.queue_length > 0:
        if cfg.swav.queue_length % env.world_size:
            raise RunError(f"swav.queue_length={cfg.swav.queue_length} must be divisible by the world size {env.world_size}")
        queue = SwAVQueue(len(cfg.swav.crops_for_assign), cfg.swav.queue_length // env.world_size,
                          cfg.model.head_out).to(device)
    # written only now that the data and the model are known to work
    resume = on_main(env, _prepare_run_dir, run_dir, cfg, resume, env.is_main)  # rank 0 decides, all follow
    model = prepare_model(model, cfg, env, device)  # one process: unchanged; else SyncBN, DDP or FSDP2
    net = _unwrap(model)
    if cfg.model.compile:
        # in place (state-dict keys and checkpoints unchanged); static shapes: one graph per crop resolution
        net.backbone.compile(dynamic=False)
    optimizer = build_optimizer(net, cfg)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.optim.precision)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    method = SwAVMethod(model, cfg, queue, autocast)

    step = 0
    counters = {"bad_images": {}, "skipped_steps": 0, "images_seen": 0}
    state = None
    if resume:
        path, state = latest_checkpoint(run_dir, shallow=True)  # .dcp: tensors are loaded by _restore
        saved_cfg = config_from_dict(state["config"])
        diff = _config_diff(saved_cfg, cfg)
        if diff:
            raise CheckpointError(f"checkpoint {path} was trained with a different config ({diff})")
        _restore(state, model, optimizer, queue, env, path)
        step = int(state["step"])
        counters.update(state.get("counters", {}))
        if env.is_main:
            _truncate_metrics(run_dir, step)
    stop = sched["total_steps"] if max_steps is None else min(max_steps, sched["total_steps"])
    budget_s = cfg.optim.minutes * 60
    spent = float(counters.get("train_seconds", 0.0))  # wall-clock seconds of training so far (resumes too)
    time_up = bool(budget_s) and spent >= budget_s
    if time_up:
        stop = step  # a finished time-budgeted run: nothing left to do

    log = MetricsLog(run_dir, cfg, step, stop, env.is_main)
    if env.is_main:
        log.message(
            f"openseer: {source.description}; world {env.world_size}, global batch {sched['global_batch']} "
            f"({sched['batch_per_rank']}/rank), peak LR {sched['peak_lr']:.4g}, {sched['total_steps']} steps "
            f"({sched['steps_per_epoch']}/epoch){f' or {cfg.optim.minutes:g} minutes, whichever comes first' if budget_s else ''}, "
            f"{'resuming at step ' + str(step) if resume else 'from scratch'}"
            f"{', stopping at step ' + str(stop) if stop < sched['total_steps'] else ''} -> {run_dir}"
        )
        for note in auto_notes:
            log.message(f"openseer: {note}")
        (run_dir / "schedule.json").write_text(json.dumps(sched, indent=1))
    health = Health(cfg, run_dir, env, counters, log.message)

    batches = iterate_batches(source, cfg, env.rank, env.world_size, step, stop)
    prepare_stream(batches, run_dir, state if resume else None, env.is_main)  # tar shards: position, provenance
    if env.is_main and source.kind == "files":  # folders: what was read, deny-list in force
        record_provenance(run_dir, source.provenance(), step, source.deny)
    run = Run(cfg=cfg, device=device, env=env, sched=sched, method=method, optimizer=optimizer,
              scaler=torch.amp.GradScaler("cuda") if cfg.optim.precision == "fp16" else None,
              step=step, counters=counters, spent_s=spent, t_loop=time.perf_counter() - spent,  # the clock of the whole run
              fault_nan_steps={int(x) for x in os.environ.get("OPENSEER_FAULT_NAN_STEPS", "").split(",") if x.strip()})
    return _SetUp(run, run_dir, model, net, queue, log, health, batches, stop, time_up)


def _count_bad_images(batch: Batch, run: Run, run_dir: Path) -> None:
    if batch.bad:
        bad_images = run.counters["bad_images"]
        for reason, n in count_reasons(batch.bad).items():
            bad_images[reason] = bad_images.get(reason, 0) + n
        _append_bad(run_dir, batch.bad, run.env.is_main)


def _flush_health(window: Window, health: Health) -> Window:
    """Run the spike/collapse checks over the window's losses so far (one wait for the device)."""
    if window.history:
        _, history = window.read()
        health.observe(history)
        window.history = []
    return window


def _log_row(window: Window, stats: StepStats, run: Run, health: Health, log: MetricsLog, monitor: dict) -> None:
    """One metrics row for the window that ends at this step (all ranks: the loss is averaged)."""
    means, history = window.read()
    health.observe(history)
    step, k = run.step, run.cfg.swav.n_prototypes
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
        "prototypes_used": means.get("prototypes_used", 0.0),
        "assign_entropy": means.get("assign_entropy", 0.0),
        "ln_k": ln_k(k),
        "skipped_steps": counters["skipped_steps"],
        "loss_spikes": counters["loss_spikes"],
        "bad_images": sum(counters["bad_images"].values()),
        "collapse_warning": health.collapse_warned,
    }
    row.update(monitor)
    log.write(row)


def _checkpoint(run_dir, step, model, optimizer, queue, cfg, sched, counters, env, log, data=None) -> None:
    state = _state(step, model, optimizer, queue, cfg, sched, counters, data)
    if is_sharded(_unwrap(model)):  # FSDP: every rank writes its shards (DCP)
        try:
            save_sharded(state, _unwrap(model), optimizer, run_dir, step, cfg.checkpoint.keep)
        except CheckpointError as e:
            log.message(f"WARNING: {e}. Training continues; the next checkpoint will be tried at the usual interval.")
        return
    if not env.is_main:
        return
    try:
        save_checkpoint(state, run_dir, step, cfg.checkpoint.keep)
    except CheckpointError as e:
        log.message(f"WARNING: {e}. Training continues; the next checkpoint will be tried at the usual interval.")


def _run_monitor(net: SwAV, cfg: Config, device: torch.device, env: DistEnv) -> dict:
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


def _append_bad(run_dir: Path, bad: list[tuple[str, str]], main: bool) -> None:
    if main:
        with open(run_dir / "bad_images.txt", "a") as f:
            for key, reason in bad:
                f.write(f"{reason}\t{key}\n")
