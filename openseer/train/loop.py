"""The one flat SwAV training loop: batch -> forward -> Sinkhorn targets -> loss -> LARC step -> checkpoint.

``pretrain(cfg, run_dir)`` starts a run; ``pretrain(..., resume=True)`` continues the run in
``run_dir`` from its latest checkpoint with the same step, LR, data order, queue and optimiser state.
The same code runs in one process or under torchrun (DDP or FSDP2, see train/parallel.py; FSDP
runs write sharded DCP checkpoints, see train/checkpoint.py and train/sharded.py).
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..config import Config, ConfigError, config_from_dict, load_config, save_config, to_dict
from ..data.batches import Batch, count_reasons, data_state, iterate_batches, prepare_stream, steps_per_epoch
from ..data.sources import FolderSource, open_source
from ..data.takedown import record_provenance
from ..fileio import atomic_write_text
from ..model.swav import SwAV, SwAVLoss, SwAVQueue, assignment_stats, build_swav, ln_k
from .checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, save_checkpoint
from .distributed import (
    DistEnv,
    all_reduce_scalar,
    any_across_ranks,
    check_dist,
    cuda_index,
    env_from_os,
    gather_cat,
    init_distributed,
    on_main,
)
from .hardware import resolve_auto
from .optim import build_optimizer, lr_at, peak_lr
from .parallel import full_tensor, is_sharded, prepare_model
from .sharded import restore_state, save_sharded

# overrides that may change when a run is resumed; everything else must match the checkpoint
RESUMABLE_KEYS = ("checkpoint.", "log.", "data.num_workers", "monitor.", "threads", "device", "dist.backend",
                  "dist.strategy", "dist.fsdp_wrap", "dist.activation_checkpointing",
                  "model.compile", "model.pointwise_matmul",
                  "model.narrow_group_fp32")  # speed, not the math (tests/train/test_levers.py)


class RunError(RuntimeError):
    """A run that cannot start or continue; the message says what and how to fix it."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("device=cuda but no CUDA GPU is visible; use device=cpu")
    return torch.device(name)


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


class MetricsLog:
    """metrics.jsonl (one JSON object per logged step), TensorBoard scalars and a progress bar."""

    def __init__(self, run_dir: Path, cfg: Config, sched: dict, start_step: int, stop_step: int, main: bool):
        self.main = main
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        self.bar = None
        self.by_time = cfg.optim.minutes > 0  # under a time budget the bar counts seconds: steps are not known
        if not main:
            return
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:
                warnings.warn("tensorboard is not installed: TensorBoard scalars are off", stacklevel=1)
        if cfg.log.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=round(cfg.optim.minutes * 60) if self.by_time else stop_step,
                            initial=0 if self.by_time else start_step, unit="s" if self.by_time else "step",
                            dynamic_ncols=True, desc="pretrain", smoothing=0.1)

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
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", img_s=f"{row['imgs_per_s']:.0f}")

    def tick(self, spent_s: float) -> None:
        if self.bar is None:
            return
        if self.by_time:
            self.bar.update(max(0, min(round(spent_s), self.bar.total) - self.bar.n))
        else:
            self.bar.update(1)

    def message(self, text: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _unwrap(model) -> SwAV:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _state(step: int, model, optimizer, queue: SwAVQueue | None, cfg: Config, sched: dict, counters: dict,
           data: dict | None = None) -> dict:
    """Everything needed to continue bit for bit. The queue is gathered from all ranks; ``data`` is the
    stream position of tar-shard sources (data/stream_batches.py), gathered from all ranks."""
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
        state["queue"] = {"embeddings": gather_cat(queue.embeddings, dim=1), "filled": int(queue.filled) * world}
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
        full = saved["embeddings"]
        share = queue.length
        if full.shape[1] != share * env.world_size or full.shape[2] != queue.embeddings.shape[2]:
            raise CheckpointError(f"checkpoint {path} queue shape {tuple(full.shape)} does not fit swav.queue_length")
        queue.embeddings.copy_(full[:, env.rank * share:(env.rank + 1) * share])
        queue.filled.fill_(min(int(saved["filled"]) // env.world_size, share))


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


def pretrain(cfg: Config, run_dir: str | Path, resume: bool | str = False, max_steps: int | None = None) -> dict:
    """Run (or continue) SwAV pretraining; returns a summary dict (final step, loss, counters).
    Under torchrun it starts the process group, or uses the one already started, and leaves it open
    (a later call in the same process reuses it); the process's owner closes it with
    ``close_distributed()`` when done, as ``openseer pretrain`` does."""
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device)
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
    source = open_source(cfg.data.source, cfg.data.limit, data_cfg=cfg.data)
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
    criterion = SwAVLoss(cfg.n_crops, cfg.swav.crops_for_assign, cfg.swav.temperature, cfg.swav.epsilon,
                         cfg.swav.sinkhorn_iters, queue, cfg.swav.queue_start_step)

    step = 0
    counters = {"bad_images": {}, "skipped_steps": 0, "images_seen": 0}
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

    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.optim.precision)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    scaler = torch.amp.GradScaler("cuda") if cfg.optim.precision == "fp16" else None

    log = MetricsLog(run_dir, cfg, sched, step, stop, env.is_main)
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

    K = cfg.swav.n_prototypes
    monitor_result: dict = {}
    fault_nan_steps = {int(x) for x in os.environ.get("OPENSEER_FAULT_NAN_STEPS", "").split(",") if x.strip()}
    loss_ema: float | None = None
    counters.setdefault("loss_spikes", 0)
    collapse_run, collapse_warned, bad_in_a_row = 0, False, 0
    acc = _Accumulator()
    timings = {"data": 0.0, "forward": 0.0, "sinkhorn": 0.0, "backward": 0.0, "optimizer": 0.0}
    last_ckpt_step = step
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    batches = iterate_batches(source, cfg, env.rank, env.world_size, step, stop)
    prepare_stream(batches, run_dir, state if resume else None, env.is_main)  # tar shards: position, provenance
    folder = getattr(source, "base", source)
    if env.is_main and isinstance(folder, FolderSource):  # folders: what was read, deny-list in force
        record_provenance(run_dir, folder.provenance(), step, folder.deny)
    t_wait = time.perf_counter()
    t_loop = t_wait - spent  # the clock of the whole run, resumed runs included
    preempted = None
    stop_request = _StopRequest()
    try:
        stop_request.__enter__()
        for batch in batches:
            batch: Batch
            t0 = time.perf_counter()
            timings["data"] += t0 - t_wait
            if batch.bad:
                for reason, n in count_reasons(batch.bad).items():
                    counters["bad_images"][reason] = counters["bad_images"].get(reason, 0) + n
                _append_bad(run_dir, batch.bad, env.is_main)
            crops = [c.to(device, non_blocking=True) for c in batch.crops]
            lr = lr_at(step, sched["total_steps"], sched["peak_lr"], cfg.optim.warmup_steps,
                       cfg.optim.warmup_start_ratio, cfg.optim.final_lr_ratio,
                       time_fraction=spent / budget_s if budget_s else 0.0)
            for g in optimizer.param_groups:
                g["lr"] = lr

            with autocast():
                z, scores = model(crops)
            sync()
            t1 = time.perf_counter()
            protos = full_tensor(net.prototypes.weight) if queue is not None else net.prototypes.weight
            targets = criterion.targets(z, scores, protos, step)
            sync()
            t2 = time.perf_counter()
            loss = criterion(scores, targets)
            if step in fault_nan_steps:
                loss = loss * float("nan")  # fault injection for the reliability tests
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler else loss).backward()
            if step < cfg.swav.freeze_prototypes_steps:
                net.prototypes.layer.weight.grad = None  # frozen: no grad, no momentum, no decay
            if scaler:
                scaler.unscale_(optimizer.optim)
            sync()
            t3 = time.perf_counter()
            loss_value = float(loss.detach())
            bad = not math.isfinite(loss_value) or not optimizer.grads_finite()
            # one all-reduce per step: a bad step anywhere, and a stop signal anywhere (acted on below)
            bad, stop_signalled = any_across_ranks(bad, stop_request.signal is not None)
            if bad:
                counters["skipped_steps"] += 1
                bad_in_a_row += 1
                optimizer.zero_grad(set_to_none=True)
                _write_diagnostic(run_dir, step, loss_value, scores, targets, batch.keys, env)
                log.message(f"step {step}: non-finite loss or gradient ({loss_value}); step skipped "
                            f"({bad_in_a_row} in a row), diagnostic in {run_dir / 'diagnostics'}")
                if bad_in_a_row >= cfg.optim.max_bad_steps:
                    raise RunError(f"{bad_in_a_row} consecutive non-finite steps at step {step}: stopping. "
                                   f"Lower optim.base_lr, use optim.precision=fp32, or check the data "
                                   f"(diagnostics in {run_dir / 'diagnostics'})")
            else:
                bad_in_a_row = 0
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                if step >= cfg.swav.freeze_prototypes_steps:
                    net.prototypes.normalize_()  # unit rows for the next forward; frozen ones stay bit-identical
            sync()
            t4 = time.perf_counter()
            timings["forward"] += t1 - t0
            timings["sinkhorn"] += t2 - t1
            timings["backward"] += t3 - t2
            timings["optimizer"] += t4 - t3
            step += 1
            n_imgs = len(batch.keys) * env.world_size
            counters["images_seen"] += n_imgs
            used, entropy = assignment_stats(scores.detach())
            acc.add(loss_value if not bad else float("nan"), n_imgs, used, entropy)
            spent = time.perf_counter() - t_loop
            if budget_s:  # every rank must agree on the LR and on when to stop: the slowest clock decides
                spent = all_reduce_scalar(spent, "max")
                time_up = spent >= budget_s
            counters["train_seconds"] = round(spent, 3)
            log.tick(spent)

            if not bad:
                if loss_ema is not None and step > 20 and loss_value > 1.5 * loss_ema + 0.5:
                    counters["loss_spikes"] += 1
                    log.message(f"step {step}: loss spike {loss_value:.3f} (recent average {loss_ema:.3f})")
                loss_ema = loss_value if loss_ema is None else 0.95 * loss_ema + 0.05 * loss_value
            if step > cfg.swav.freeze_prototypes_steps and math.isfinite(loss_value):
                collapse_run = collapse_run + 1 if loss_value > 0.9 * ln_k(K) else 0
                if collapse_run >= cfg.log.collapse_patience and not collapse_warned:
                    collapse_warned = True
                    log.message(
                        f"WARNING: the loss has stayed near ln K = {ln_k(K):.2f} for {collapse_run} steps: "
                        "the model may have collapsed. Try swav.epsilon=0.03, a longer "
                        "swav.freeze_prototypes_steps, model.head_bn=false, a later swav.queue_start_step, "
                        "or fewer prototypes than the batch can fill."
                    )
            last = step == stop or time_up
            if cfg.monitor.every and cfg.monitor.data and (step % cfg.monitor.every == 0 or last):
                monitor_result = _run_monitor(net, cfg, device, env)
            if step % cfg.log.every == 0 or last:
                elapsed = time.perf_counter() - acc.t_start
                row = {
                    "step": step,
                    "epoch": round(step / sched["steps_per_epoch"], 4),
                    "loss": all_reduce_scalar(acc.mean_loss()),
                    "lr": lr,
                    "imgs_per_s": acc.images / max(elapsed, 1e-9),
                    "data_s": timings["data"] / acc.steps,
                    "step_s": elapsed / acc.steps,
                    "forward_s": timings["forward"] / acc.steps,
                    "sinkhorn_s": timings["sinkhorn"] / acc.steps,
                    "backward_s": timings["backward"] / acc.steps,
                    "optimizer_s": timings["optimizer"] / acc.steps,
                    "prototypes_used": acc.mean("used"),
                    "assign_entropy": acc.mean("entropy"),
                    "ln_k": ln_k(K),
                    "skipped_steps": counters["skipped_steps"],
                    "loss_spikes": counters["loss_spikes"],
                    "bad_images": sum(counters["bad_images"].values()),
                    "collapse_warning": collapse_warned,
                }
                row.update(monitor_result)
                monitor_result = {}
                log.write(row)
                acc = _Accumulator()
                timings = dict.fromkeys(timings, 0.0)
            if step % cfg.checkpoint.every == 0 and not last:
                _checkpoint(run_dir, step, model, optimizer, queue, cfg, sched, counters, env, log,
                            data=data_state(batches))
                last_ckpt_step = step
            if stop_signalled:
                preempted = signal.Signals(stop_request.signal).name if stop_request.signal else "peer"
                log.message(f"openseer: {preempted} received: checkpointing at step {step} and exiting")
                break
            if time_up:
                log.message(f"openseer: time budget of {cfg.optim.minutes:g} minutes reached at step {step}")
                break
            t_wait = time.perf_counter()
    finally:
        stop_request.__exit__()
        log.close()
    if step != last_ckpt_step or not list_checkpoints(run_dir):
        _checkpoint(run_dir, step, model, optimizer, queue, cfg, sched, counters, env, log, data=data_state(batches))
    if counters["bad_images"] and env.is_main:
        print(f"openseer: skipped unreadable images: {counters['bad_images']} (listed in {run_dir / 'bad_images.txt'})")
    summary = {"step": step, "total_steps": sched["total_steps"], "counters": counters, "run_dir": str(run_dir),
               "preempted": preempted, "time_budget_reached": time_up}
    if env.world_size > 1:
        dist.barrier()
    return summary


class _Accumulator:
    def __init__(self):
        self.t_start = time.perf_counter()
        self.steps, self.images = 0, 0
        self.losses: list[float] = []
        self.sums = {"used": 0.0, "entropy": 0.0}

    def add(self, loss: float, images: int, used: int, entropy: float) -> None:
        self.steps += 1
        self.images += images
        self.losses.append(loss)
        self.sums["used"] += used
        self.sums["entropy"] += entropy

    def mean_loss(self) -> float:
        good = [x for x in self.losses if math.isfinite(x)]
        return sum(good) / len(good) if good else float("nan")

    def mean(self, key: str) -> float:
        return self.sums[key] / max(self.steps, 1)


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


def _write_diagnostic(run_dir: Path, step: int, loss: float, scores, targets, keys, env: DistEnv) -> None:
    folder = run_dir / "diagnostics"
    folder.mkdir(exist_ok=True)
    s = scores.detach().float()
    diag = {
        "step": step,
        "rank": env.rank,
        "loss": loss,
        "scores_finite_fraction": float(torch.isfinite(s).float().mean()),
        "scores_absmax": float(s[torch.isfinite(s)].abs().max()) if torch.isfinite(s).any() else float("nan"),
        "scores_sample": s[:8].tolist(),
        "assignments_sample": {str(i): q[:8].argmax(1).tolist() for i, q in targets.items()},
        "keys": list(keys),
    }
    (folder / f"step_{step:08d}_rank{env.rank}.json").write_text(json.dumps(diag))
