"""Distillation as a method of the one loop: a small student backbone trained on unlabelled images to
reproduce a frozen teacher's features (``openseer distill``; the entry point is train/distill.py).

The student is ``cfg.model.arch`` (any timm backbone), the teacher ``cfg.distill.teacher`` (anything
``openseer.load`` accepts: a run, a checkpoint, an exported or imported file, a timm name). Both see
the same augmented crops of each step (the multi-crop batches of ``pretrain``, a function of (seed,
step)); the teacher is frozen in eval mode and gets the crops re-normalised with its own mean/std.
The student's pooled features go through a linear projection to the teacher's width, and the loss
is one of

- ``cosine`` (default): ``1 - cos(proj(student), teacher)`` per crop, averaged;
- ``swav``: the projected student goes through the teacher's own frozen SwAV head and prototypes
  (the teacher must be a run or checkpoint that holds them) and is trained with cross-entropy to
  the teacher's soft assignment ``softmax(scores / distill.teacher_temperature)``.

The run directory is a normal one (``model.arch`` = the student; ``checkpoints/`` whose ``backbone.*``
tensors are the student's), so ``eval``, ``export``, ``embed`` and ``report`` take it; the loop is
``pretrain``'s (data, checkpoints, bit-exact resume, time budget, SIGTERM, progress, torchrun with DDP).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from itertools import groupby
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...config import Config, config_from_dict
from ...model.backbone import BackboneError, build_backbone, feature_dim
from ...model.checkpoint_file import CheckpointError, latest_checkpoint, load_checkpoint
from ...model.load import load_backbone
from ...model.swav import MethodOutput, ProjectionHead, Prototypes
from ...rundir import RunError
from ..distributed import DistEnv


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
    """Distillation's part of a training step: teacher features, projected student, loss, backward.

    ``model`` is the student as the loop runs it (possibly wrapped in DDP). The loop around it (LR,
    one verdict on finite gradients, optimiser step, logging, checkpoints) is the one loop's; the
    teacher is frozen and rebuilt from the config, so a checkpoint holds nothing of this method's own."""

    name = "distill"  # the label of the run's progress and log lines
    phases = ("forward", "backward")
    collapse_loss = None  # a feature-matching loss has no collapse level

    def __init__(self, cfg: Config, student: nn.Module, teacher: Teacher, autocast=nullcontext):
        self.cfg, self.model, self.teacher, self.autocast = cfg, student, teacher, autocast
        self.student = getattr(student, "module", student)  # DDP keeps the module inside

    def forward_backward(self, crops: list[torch.Tensor], step: int,
                         scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
                         mark: Callable[[str], None] | None = None) -> MethodOutput:
        """One forward and backward on this rank's crops (see SwAVMethod.forward_backward)."""
        mark = mark or (lambda _: None)
        with self.autocast():
            target = self.teacher.features(crops)
            out = self.model(crops)
        mark("forward")
        loss = distill_loss(self.cfg, self.teacher, out, target)
        (scale(loss) if scale else loss).backward()
        mark("backward")
        with torch.no_grad():
            cos = F.cosine_similarity(out.detach().float(), target, dim=1).mean()
        return MethodOutput(loss.detach().float(), {"cosine_to_teacher": cos}, {"student": out.detach()})

    def after_step(self, step: int) -> None:
        """Nothing to do after an optimiser step (the teacher is frozen)."""

    def diagnose(self, out: MethodOutput) -> dict:
        """JSON-ready facts about a non-finite step (the projected student features of this rank)."""
        s = out.diagnostic["student"].float()
        finite = torch.isfinite(s)
        return {"student_finite_fraction": float(finite.float().mean()),
                "student_absmax": float(s[finite].abs().max()) if finite.any() else float("nan")}

    def row(self, means: dict) -> dict:
        """This method's column of a metrics row: the mean cosine of the student to the teacher."""
        return {"cosine_to_teacher": means.get("cosine_to_teacher", 0.0)}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, path="the checkpoint") -> None:
        """Nothing to restore: the student is the model, the teacher comes from the config."""


def feature_agreement(run_dir: str | Path, images: torch.Tensor, checkpoint: str | Path | None = None) -> float:
    """Mean cosine similarity, over ``images`` (uint8 (B, C, H, W)), between the projected student of
    a distill run (its latest checkpoint, or ``checkpoint``) and its teacher, both fed through the
    eval transform: how closely the student reproduces the teacher."""
    from ...eval.common import EvalTransform

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




class DistillTraining:
    """Builds distillation for ``openseer distill`` (see train/methods/__init__.py): loads the teacher
    at once (a bad teacher is refused before any data is read), then the student."""

    name = "distill"

    def __init__(self, cfg: Config, env: DistEnv, device: torch.device):
        if env.world_size > 1 and cfg.dist.strategy == "fsdp":
            raise RunError("openseer distill runs under DDP: use dist.strategy=ddp (a student is small)")
        self.cfg, self.device = cfg, device
        self.teacher = Teacher(cfg.distill.teacher, cfg.distill.teacher_arch, list(cfg.crops.mean),
                               list(cfg.crops.std), device, need_prototypes=cfg.distill.loss == "swav")
        self.student: Student | None = None

    def build_model(self) -> nn.Module:
        m = self.cfg.model
        try:
            backbone = build_backbone(m.arch, zero_init_last=m.zero_init_last, stem_stride=m.stem_stride)
        except BackboneError as e:
            raise BackboneError(f"the student (--student): {e}") from None
        self.student = Student(backbone, self.teacher.dim, channels_last=m.channels_last).to(self.device)
        if m.channels_last:
            self.student = self.student.to(memory_format=torch.channels_last)
        return self.student

    def build_method(self, model: nn.Module, autocast) -> DistillMethod:
        return DistillMethod(self.cfg, model, self.teacher, autocast)

    def describe(self) -> str:
        t, cfg = self.teacher, self.cfg
        n = sum(p.numel() for p in self.student.backbone.parameters()) / 1e6 if self.student else 0.0
        return (f"distill {t.info['arch']} ({cfg.distill.teacher}, {t.dim}-d) -> {cfg.model.arch} "
                f"({n:.2f}M parameters), loss {cfg.distill.loss}; ")


__all__ = ["DistillMethod", "DistillTraining", "Student", "Teacher", "distill_loss", "feature_agreement",
           "report_model"]
