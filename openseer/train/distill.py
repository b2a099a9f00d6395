"""Distillation: a small student backbone trained on unlabelled images to reproduce a teacher's features.

``distill(cfg, run_dir)`` trains ``cfg.model.arch`` (any timm backbone) against ``cfg.distill.teacher``
(anything ``openseer.load`` accepts: a run, a checkpoint, an exported or imported file, a timm name).
Both see the same augmented crops of each step (the multi-crop batches of ``pretrain``, a function
of (seed, step)); the teacher is frozen in eval mode and gets the crops re-normalised with its own
mean/std. The student's pooled features go through a linear projection to the teacher's width, and
the loss is one of

- ``cosine`` (default): ``1 - cos(proj(student), teacher)`` per crop, averaged;
- ``swav``: the projected student goes through the teacher's own frozen SwAV head and prototypes
  (the teacher must be a run or checkpoint that holds them) and is trained with cross-entropy to
  the teacher's soft assignment ``softmax(scores / distill.teacher_temperature)``.

The run directory is a normal one (``config.yaml`` with ``model.arch`` = the student, ``metrics.jsonl``,
``checkpoints/`` whose ``backbone.*`` tensors are the student's), so ``eval``, ``export``, ``embed`` and
``report`` take it; the same data layer, checkpoints, resume (bit-exact on CPU), time budget
(``optim.minutes``), SIGTERM handling and progress as ``pretrain`` (train/loop.py's pieces, reused).
One process: distillation of a small student does not need torchrun.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from itertools import groupby
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, build_config, config_from_dict
from ..data.batches import count_reasons, data_state, iterate_batches, prepare_stream
from ..data.collection import open_collection
from ..data.takedown import record_provenance
from ..device import resolve_device
from ..model.backbone import BackboneError, build_backbone, feature_dim
from ..model.checkpoint_file import CheckpointError, latest_checkpoint, load_checkpoint
from ..model.load import load_backbone
from ..model.swav import ProjectionHead, Prototypes
from .checkpoint import list_checkpoints
from .distributed import env_from_os
from .hardware import resolve_auto
from .loop import (
    MetricsLog,
    RunError,
    _announce_stop,
    _append_bad,
    _checkpoint,
    _config_diff,
    _prepare_run_dir,
    _restore,
    _StopRequest,
    _truncate_metrics,
    schedule,
)
from .optim import build_optimizer, lr_at


def _per_resolution(backbone: nn.Module, crops: list[torch.Tensor], channels_last: bool) -> torch.Tensor:
    """Pooled features of all crops, one pass per resolution group (as SwAV.features does)."""
    feats = []
    for _, group in groupby(crops, key=lambda c: tuple(c.shape[-2:])):
        group = list(group)
        x = torch.cat(group) if len(group) > 1 else group[0]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats.append(backbone(x))
    return torch.cat(feats)


class Student(nn.Module):
    """The student backbone and a linear projection of its features to the teacher's width."""

    def __init__(self, backbone: nn.Module, teacher_dim: int, channels_last: bool = False):
        super().__init__()
        self.backbone = backbone
        self.proj = nn.Linear(feature_dim(backbone), teacher_dim)
        self.channels_last = channels_last

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        return self.proj(_per_resolution(self.backbone, crops, self.channels_last).float())


class Teacher:
    """A frozen teacher: features of crops normalised for the student, re-normalised for it.

    ``head`` and ``prototypes`` (the SwAV loss) come from the teacher's training checkpoint."""

    def __init__(self, spec: str, arch: str | None, student_mean: list[float], student_std: list[float],
                 device: torch.device, need_prototypes: bool = False):
        if not spec:
            raise BackboneError("no teacher given: openseer distill TEACHER (a run, checkpoint, exported file "
                                "or timm name)")
        try:
            self.backbone, self.info = load_backbone(spec, arch=arch or None)
        except (BackboneError, CheckpointError) as e:
            raise type(e)(f"the teacher: {e}") from None
        self.backbone.to(device).eval().requires_grad_(False)
        self.dim = int(self.info["feature_dim"])
        s_mean, s_std = torch.tensor(student_mean), torch.tensor(student_std)
        t_mean, t_std = torch.tensor(self.info["mean"]), torch.tensor(self.info["std"])
        # x_teacher = (x_student * s_std + s_mean - t_mean) / t_std, per channel
        self.scale = (s_std / t_std).view(1, 3, 1, 1).to(device)
        self.shift = ((s_mean - t_mean) / t_std).view(1, 3, 1, 1).to(device)
        self.head = self.prototypes = None
        if need_prototypes:
            self.head, self.prototypes = _teacher_head(spec, device)

    @torch.no_grad()
    def features(self, crops: list[torch.Tensor]) -> torch.Tensor:
        return _per_resolution(self.backbone, [c * self.scale + self.shift for c in crops], False).float()

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Teacher prototype scores of (teacher-width) features; differentiable in ``features``."""
        z = F.normalize(self.head(features).float(), dim=1)
        return self.prototypes(z)


def _teacher_head(spec: str, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """The frozen SwAV projection head and prototypes of a teacher run or training checkpoint."""
    path = Path(spec).expanduser()
    none = (f"the teacher's SwAV head and prototypes are needed (by distill.loss=swav, and by openseer report of "
            f"a distilled student): that needs a teacher trained by openseer pretrain (a run or its checkpoint); "
            f"{spec} has none. Distil with distill.loss=cosine")
    if not path.exists() or path.suffix == ".safetensors":
        raise CheckpointError(none)
    try:
        if path.is_dir() and path.suffix != ".dcp":
            path, state = latest_checkpoint(path)
        else:
            state = load_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"the teacher's SwAV head and prototypes are needed: {e}") from None
    model = state.get("model") if isinstance(state.get("model"), dict) else None
    if model is None or not isinstance(state.get("config"), dict) or "prototypes.layer.weight" not in {
            k.replace("module.", "").replace("_orig_mod.", "") for k in model}:
        raise CheckpointError(none)
    tcfg = config_from_dict(state["config"])
    m = tcfg.model
    clean = {k.replace("module.", "").replace("_orig_mod.", ""): v for k, v in model.items()}
    with torch.random.fork_rng(devices=[]):  # built only to be overwritten: leave the run's RNG alone
        head = ProjectionHead(_in_dim(clean), list(m.head_hidden), m.head_out, m.head_bn)
        protos = Prototypes(m.head_out, tcfg.swav.n_prototypes)
    head.load_state_dict({k[len("head."):]: v for k, v in clean.items() if k.startswith("head.")})
    protos.load_state_dict({k[len("prototypes."):]: v for k, v in clean.items() if k.startswith("prototypes.")})
    for mod in (head, protos):
        mod.to(device).eval().requires_grad_(False)
    return head, protos


def _in_dim(model: dict) -> int:
    """Input width of the SwAV head: the first 2-D weight under ``head.``."""
    for k, v in model.items():
        if k.startswith("head.") and k.endswith("weight") and v.ndim == 2:
            return int(v.shape[1])
    raise CheckpointError("the teacher checkpoint's SwAV head has no linear layer")


def distill_loss(cfg: Config, teacher: Teacher, student_out: torch.Tensor, teacher_feats: torch.Tensor) -> torch.Tensor:
    """The feature-matching loss of ``cfg.distill.loss`` (see the module docstring)."""
    if cfg.distill.loss == "cosine":
        return 1.0 - F.cosine_similarity(student_out.float(), teacher_feats, dim=1).mean()
    with torch.no_grad():
        target = F.softmax(teacher.scores(teacher_feats) / cfg.distill.teacher_temperature, dim=1)
    logp = F.log_softmax(teacher.scores(student_out.float()) / cfg.distill.temperature, dim=1)
    return -(target * logp).sum(1).mean()


class DistillMethod:
    """One step's forward and backward for distillation: teacher features, projected student, loss.

    ``forward_backward(crops, step) -> (loss, cosine to the teacher)`` leaves the gradients on the
    student; the loop around it (LR, finite checks, optimiser step, logging, checkpoints) is the
    training loop's, so the method plugs into any loop that calls it once per step."""

    def __init__(self, cfg: Config, student: Student, teacher: Teacher, autocast=nullcontext):
        self.cfg, self.student, self.teacher, self.autocast = cfg, student, teacher, autocast

    def forward_backward(self, crops: list[torch.Tensor], step: int) -> tuple[float, float]:
        with self.autocast():
            target = self.teacher.features(crops)
            out = self.student(crops)
        loss = distill_loss(self.cfg, self.teacher, out, target)
        loss.backward()
        with torch.no_grad():
            cos = float(F.cosine_similarity(out.detach().float(), target, dim=1).mean())
        return float(loss.detach()), cos


def feature_agreement(run_dir: str | Path, images: torch.Tensor, checkpoint: str | Path | None = None) -> float:
    """Mean cosine similarity, over ``images`` (uint8 (B, C, H, W)), between the projected student of
    a distill run (its latest checkpoint, or ``checkpoint``) and its teacher, both fed through the
    eval transform: how closely the student reproduces the teacher."""
    from ..eval.common import EvalTransform

    run_dir = Path(run_dir)
    path, state = (Path(checkpoint), load_checkpoint(checkpoint)) if checkpoint else latest_checkpoint(run_dir)
    cfg = config_from_dict(state["config"])
    if not cfg.distill.teacher:
        raise CheckpointError(f"{path} is not a distill checkpoint (its config has no distill.teacher)")
    device = torch.device("cpu")
    teacher = Teacher(cfg.distill.teacher, cfg.distill.teacher_arch, list(cfg.crops.mean), list(cfg.crops.std), device)
    m = cfg.model
    student = Student(build_backbone(m.arch, stem_stride=m.stem_stride), teacher.dim)
    student.load_state_dict(state["model"])
    student.eval()
    x = EvalTransform(cfg.crops.sizes[0], tuple(cfg.crops.mean), tuple(cfg.crops.std))(images)
    with torch.inference_mode():
        return float(F.cosine_similarity(student([x]), teacher.features([x]), dim=1).mean())


class _ReportModel(nn.Module):
    """A distilled student as ``openseer report`` runs a SwAV model: backbone, head, prototypes, where the
    head is the student's projection followed by the teacher's SwAV head, the prototypes the teacher's."""

    def __init__(self, backbone: nn.Module, proj: nn.Module, head: nn.Module, prototypes: nn.Module):
        super().__init__()
        self.backbone, self.prototypes = backbone, prototypes
        self.head = nn.Sequential(proj, head)


def report_model(state: dict, cfg: Config) -> nn.Module:
    """The student of a distill checkpoint read through its teacher's prototypes (the teacher must be an
    openseer run or checkpoint, which holds them); CheckpointError otherwise."""
    head, protos = _teacher_head(cfg.distill.teacher, torch.device("cpu"))
    m = cfg.model
    backbone = build_backbone(m.arch, stem_stride=m.stem_stride)
    student = Student(backbone, _head_in(head))
    student.load_state_dict({k.replace("_orig_mod.", ""): v for k, v in state["model"].items()})
    return _ReportModel(student.backbone, student.proj, head, protos).eval()


def _head_in(head: nn.Module) -> int:
    return next(mod.in_features for mod in head.modules() if isinstance(mod, nn.Linear))


def distill_config(teacher: str, student: str, data: str | None, recipe: str | None = None,
                   overrides: list[str] | None = None) -> Config:
    """The config of a new distill run: ``recipe`` (default: the teacher run's own config, else
    tiny-cpu) with the student as ``model.arch``, the teacher, ``--data`` and then ``overrides``."""
    base: dict = {"model": {"arch": student}, "distill": {"teacher": teacher}}
    if data:
        base["data"] = {"source": data}
    tpath = Path(teacher).expanduser()
    if recipe is None and tpath.is_dir() and (tpath / "config.yaml").is_file():
        from ..config import load_config, merge, parse_override, to_dict

        cfg = load_config(tpath / "config.yaml")
        keep = to_dict(cfg)
        keep.pop("distill", None)
        cfg = config_from_dict(keep)
        cfg.recipe = f"distill from {teacher}"
        merge(cfg, base)
        for text in overrides or []:
            merge(cfg, parse_override(text))
        cfg.validate()
        return cfg
    return build_config(recipe or "tiny-cpu", overrides, base=base)


def distill(cfg: Config, run_dir: str | Path, resume: bool | str = False, max_steps: int | None = None) -> dict:
    """Run (or continue) distillation of ``cfg.model.arch`` from ``cfg.distill.teacher``; a summary dict."""
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device, option="device=")
    cfg, auto_notes = resolve_auto(cfg, device)
    if cfg.optim.precision == "fp16" and device.type != "cuda":
        raise RunError("optim.precision=fp16 needs CUDA; use bf16 or fp32 on CPU")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if env_from_os().world_size > 1:
        raise RunError("openseer distill runs in one process: start it without torchrun")
    env = env_from_os()
    _prepare_run_dir(run_dir, cfg, resume, True, write=False)  # a bad --out is refused before any work
    teacher = Teacher(cfg.distill.teacher, cfg.distill.teacher_arch, list(cfg.crops.mean), list(cfg.crops.std),
                      device, need_prototypes=cfg.distill.loss == "swav")
    source = open_collection(cfg.data.source, limit=cfg.data.limit, data_cfg=cfg.data)
    sched = schedule(cfg, len(source), 1)

    torch.manual_seed(cfg.seed)
    m = cfg.model
    try:
        backbone = build_backbone(m.arch, zero_init_last=m.zero_init_last, stem_stride=m.stem_stride)
    except BackboneError as e:
        raise BackboneError(f"the student (--student): {e}") from None
    model = Student(backbone, teacher.dim, channels_last=m.channels_last).to(device)
    if m.channels_last:
        model = model.to(memory_format=torch.channels_last)
    resume = _prepare_run_dir(run_dir, cfg, resume, True)  # written only now that teacher, data and student work
    if m.compile:
        model.backbone.compile(dynamic=False)
    optimizer = build_optimizer(model, cfg)

    step = 0
    counters: dict = {"bad_images": {}, "skipped_steps": 0, "images_seen": 0}
    state = None
    if resume:
        path, state = latest_checkpoint(run_dir, shallow=True)
        diff = _config_diff(config_from_dict(state["config"]), cfg)
        if diff:
            raise CheckpointError(f"checkpoint {path} was trained with a different config ({diff})")
        _restore(state, model, optimizer, None, env, path)
        step = int(state["step"])
        counters.update(state.get("counters", {}))
        _truncate_metrics(run_dir, step)
    stop = sched["total_steps"] if max_steps is None else min(max_steps, sched["total_steps"])
    budget_s = cfg.optim.minutes * 60
    spent = float(counters.get("train_seconds", 0.0))
    time_up = bool(budget_s) and spent >= budget_s
    if time_up:
        stop = step

    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.optim.precision)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    method = DistillMethod(cfg, model, teacher, autocast)
    log = MetricsLog(run_dir, cfg, step, stop, True)
    log.message(f"openseer: distill {teacher.info['arch']} ({cfg.distill.teacher}, {teacher.dim}-d) -> {m.arch} "
                f"({sum(p.numel() for p in model.backbone.parameters()) / 1e6:.2f}M parameters), loss "
                f"{cfg.distill.loss}; {source.description}; batch {sched['global_batch']}, peak LR "
                f"{sched['peak_lr']:.4g}, {sched['total_steps']} steps"
                f"{f' or {cfg.optim.minutes:g} minutes, whichever comes first' if budget_s else ''}, "
                f"{'resuming at step ' + str(step) if resume else 'from scratch'} -> {run_dir}")
    for note in auto_notes:
        log.message(f"openseer: {note}")
    import json

    (run_dir / "schedule.json").write_text(json.dumps(sched, indent=1))

    batches = iterate_batches(source, cfg, 0, 1, step, stop)
    prepare_stream(batches, run_dir, state if resume else None, True)
    if source.kind == "files":
        record_provenance(run_dir, source.provenance(), step, source.deny)
    last_ckpt_step = step
    window = {"loss": 0.0, "cos": 0.0, "steps": 0, "images": 0, "t": time.perf_counter(), "data": 0.0}
    preempted = None
    t_wait = time.perf_counter()
    t_loop = t_wait - spent
    bad_in_a_row = 0
    stop_request = _StopRequest()
    try:
        stop_request.__enter__()
        for batch in batches:
            t0 = time.perf_counter()
            window["data"] += t0 - t_wait
            if batch.bad:
                for reason, n in count_reasons(batch.bad).items():
                    counters["bad_images"][reason] = counters["bad_images"].get(reason, 0) + n
                _append_bad(run_dir, batch.bad, True)
            crops = [c.to(device, non_blocking=True) for c in batch.crops]
            lr = lr_at(step, sched["total_steps"], sched["peak_lr"], cfg.optim.warmup_steps,
                       cfg.optim.warmup_start_ratio, cfg.optim.final_lr_ratio,
                       time_fraction=spent / budget_s if budget_s else 0.0)
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss_value, cos = method.forward_backward(crops, step)
            if not math.isfinite(loss_value) or not optimizer.grads_finite():
                counters["skipped_steps"] += 1
                bad_in_a_row += 1
                optimizer.zero_grad(set_to_none=True)
                log.message(f"step {step}: non-finite loss or gradient ({loss_value}); step skipped")
                if bad_in_a_row >= cfg.optim.max_bad_steps:
                    raise RunError(f"{bad_in_a_row} consecutive non-finite steps at step {step}: stopping. "
                                   f"Lower optim.base_lr or use optim.precision=fp32")
            else:
                bad_in_a_row = 0
                optimizer.step()
            step += 1
            counters["images_seen"] += len(batch.keys)
            window["loss"] += loss_value if math.isfinite(loss_value) else 0.0
            window["cos"] += cos
            window["steps"] += 1
            window["images"] += len(batch.keys)
            spent = time.perf_counter() - t_loop
            time_up = bool(budget_s) and spent >= budget_s
            counters["train_seconds"] = round(spent, 3)
            log.tick(spent)
            last = step == stop or time_up
            if step % cfg.log.every == 0 or last:
                elapsed = time.perf_counter() - window["t"]
                n = max(window["steps"], 1)
                log.write({"step": step, "epoch": round(step / sched["steps_per_epoch"], 4),
                           "loss": window["loss"] / n, "cosine_to_teacher": window["cos"] / n, "lr": lr,
                           "imgs_per_s": window["images"] / max(elapsed, 1e-9), "data_s": window["data"] / n,
                           "step_s": elapsed / n, "skipped_steps": counters["skipped_steps"],
                           "bad_images": sum(counters["bad_images"].values())})
                window = {"loss": 0.0, "cos": 0.0, "steps": 0, "images": 0, "t": time.perf_counter(), "data": 0.0}
            if step % cfg.checkpoint.every == 0 and not last:
                _checkpoint(run_dir, step, model, optimizer, None, cfg, sched, counters, env, log,
                            data=data_state(batches))
                last_ckpt_step = step
            if _announce_stop(log, cfg, step, stop_request.signal, stop_request.signal is not None, time_up):
                break
            t_wait = time.perf_counter()
    finally:
        stop_request.__exit__()
        log.close()
    if step != last_ckpt_step or not list_checkpoints(run_dir):
        _checkpoint(run_dir, step, model, optimizer, None, cfg, sched, counters, env, log, data=data_state(batches))
    return {"step": step, "total_steps": sched["total_steps"], "counters": counters, "run_dir": str(run_dir),
            "preempted": preempted, "time_budget_reached": time_up}


__all__ = ["DistillMethod", "Student", "Teacher", "distill", "distill_config", "distill_loss", "feature_agreement"]
