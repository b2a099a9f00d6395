"""Full fine-tuning of a classifier (backbone + linear head) on labelled images, as a method of the one loop.

``openseer finetune`` (use/finetune.py) chooses a frozen-feature protocol by cross-validation; when a
full fine-tune is tried, it starts from the linear probe that cross-validation chose (so step 0 is the
frozen protocol's accuracy) and trains everything here:

- the loss: cross-entropy on the labelled images, each class weighted inversely to its count (as the
  linear probe is: imbalanced labels do not make the head favour the big classes);
- the data: the loop's own batches of the labelled collection (the builder brings it), two views per
  image, each a random resized crop (scale ``MIN_SCALE``..1) and a horizontal flip at the model's eval
  size, no colour jitter, grayscale or blur (few labels: views that stay the class they are labelled);
  the labels come from the batch's image keys;
- the optimiser: the loop's SGD + LARC, the backbone at ``BACKBONE_LR_SCALE`` times the head's LR (its
  features are what pretraining paid for; the head is only a probe);
- batch norm: the pretrained statistics are kept (a few dozen labels give poor batch statistics).

Everything else (checkpoints, bit-exact resume, ``optim.minutes``, metrics, progress lines saying
``finetune:``) is the loop's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ...config import Config, merge, parse_override
from ...data.collection import Collection
from ...model.swav import MethodOutput
from ...rundir import RunError
from ..distributed import DistEnv

BACKBONE_LR_SCALE = 0.1  # the backbone trains at this fraction of the head's LR
MIN_SCALE = 0.25  # random resized crop: the smallest share of the image a view keeps
VIEWS = 2  # views per labelled image and step
BATCH = 32  # global batch, or every labelled image when there are fewer
STEPS = 200  # schedule length in steps when no epochs are given (the time budget may end it first)


class Classifier(nn.Module):
    """A backbone (pooled features) and a linear head on them: images -> class logits. In ``train()``
    mode its batch-norm layers keep their pretrained statistics (they stay in eval mode)."""

    def __init__(self, backbone: nn.Module, weight: torch.Tensor, bias: torch.Tensor,
                 backbone_lr_scale: float = BACKBONE_LR_SCALE):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
            self.head.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
        self.backbone_lr_scale = backbone_lr_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).float())

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        for m in self.backbone.modules():
            if isinstance(m, _BatchNorm):
                m.eval()
        return self

    def optim_groups(self) -> list[dict]:
        """The optimiser's parameter groups: the backbone at ``backbone_lr_scale`` of the head's LR
        (train/optim.py reads them; train/step.py applies ``lr_scale``)."""
        return [{"params": [p for p in self.backbone.parameters() if p.requires_grad],
                 "lr_scale": self.backbone_lr_scale},
                {"params": list(self.head.parameters()), "lr_scale": 1.0}]


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """n / (C * count) per class (0 for a class with no image): each class weighs the same in the loss."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


class FinetuneMethod:
    """Fine-tuning's part of a training step: logits of every view, class-weighted cross-entropy, backward.

    The loop calls ``forward_backward`` with the batch's image keys (``takes_keys``): the labels are
    looked up by key. Nothing of its own goes in a checkpoint (the model and optimiser are the loop's)."""

    name = "finetune"
    phases = ("forward", "backward")
    collapse_loss = None
    takes_keys = True

    def __init__(self, model: nn.Module, label_of: dict[str, int], weights: torch.Tensor, autocast=nullcontext):
        self.model, self.label_of, self.autocast = model, label_of, autocast
        self.weights = weights

    def labels(self, keys: Sequence[str], device: torch.device) -> torch.Tensor:
        try:
            return torch.tensor([self.label_of[k] for k in keys], dtype=torch.int64, device=device)
        except KeyError as e:
            raise RunError(f"finetune: image {e.args[0]!r} of a batch has no label") from None

    def forward_backward(self, crops: list[torch.Tensor], step: int,
                         scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
                         mark: Callable[[str], None] | None = None, keys: Sequence[str] = ()) -> MethodOutput:
        """One forward and backward on this rank's views (see SwAVMethod.forward_backward)."""
        mark = mark or (lambda _: None)
        x = torch.cat(crops) if len(crops) > 1 else crops[0]
        y = self.labels(keys, x.device).repeat(len(crops))
        with self.autocast():
            logits = self.model(x)
        mark("forward")
        loss = F.cross_entropy(logits.float(), y, weight=self.weights.to(x.device))
        (scale(loss) if scale else loss).backward()
        mark("backward")
        with torch.no_grad():
            right = (logits.detach().argmax(1) == y).float().mean()
        return MethodOutput(loss.detach().float(), {"train_accuracy": right}, {"logits": logits.detach()})

    def after_step(self, step: int) -> None:
        """Nothing to do after an optimiser step."""

    def diagnose(self, out: MethodOutput) -> dict:
        """JSON-ready facts about a non-finite step (this rank's logits)."""
        z = out.diagnostic["logits"].float()
        finite = torch.isfinite(z)
        return {"logits_finite_fraction": float(finite.float().mean()),
                "logits_absmax": float(z[finite].abs().max()) if finite.any() else float("nan")}

    def row(self, means: dict) -> dict:
        """This method's column of a metrics row: accuracy on the training views (augmented)."""
        return {"train_accuracy": means.get("train_accuracy", 0.0)}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, path="the checkpoint") -> None:
        """Nothing to restore: the classifier is the model."""


@dataclass
class FinetuneStart:
    """What a fine-tune starts from: the backbone (loaded, on the CPU), the linear head (folded weights
    on the raw features), the labelled images (a collection, one label per row) and the class count."""

    backbone: nn.Module
    weight: np.ndarray  # C x D
    bias: np.ndarray  # C
    images: Collection
    labels: np.ndarray
    n_classes: int
    protocol: str = "linear"  # the frozen protocol the head comes from
    backbone_lr_scale: float = BACKBONE_LR_SCALE
    label_of: dict = field(init=False)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.labels) != len(self.images):
            raise RunError(f"finetune: {len(self.images)} images but {len(self.labels)} labels")
        self.label_of: dict[str, int] = {}
        for i, c in enumerate(self.labels):
            key = self.images.batch_key(i)
            if self.label_of.setdefault(key, int(c)) != int(c):
                raise RunError(f"finetune: {key!r} is labelled twice, with different classes; label it once")

    def builder(self) -> Callable[[Config, DistEnv, torch.device], FinetuneTraining]:
        """The builder ``train(cfg, run_dir, builder)`` takes (train/loop.py)."""
        return partial(FinetuneTraining, start=self)


class FinetuneTraining:
    """Builds a full fine-tune for ``openseer finetune`` (see train/methods/__init__.py); brings the
    labelled images as the loop's collection."""

    name = "finetune"
    brings_images = True  # the loop trains on collection(), not on cfg.data.source

    def __init__(self, cfg: Config, env: DistEnv, device: torch.device, start: FinetuneStart):
        if env.world_size > 1 and cfg.dist.strategy == "fsdp":
            raise RunError("openseer finetune runs under DDP: use dist.strategy=ddp")
        self.cfg, self.device, self.start = cfg, device, start

    def collection(self) -> Collection:
        return self.start.images

    def build_model(self) -> nn.Module:
        s = self.start
        model = Classifier(copy.deepcopy(s.backbone), torch.from_numpy(np.asarray(s.weight, np.float32)),
                           torch.from_numpy(np.asarray(s.bias, np.float32)), s.backbone_lr_scale)
        return model.to(self.device).train()

    def build_method(self, model: nn.Module, autocast) -> FinetuneMethod:
        s = self.start
        return FinetuneMethod(model, s.label_of, class_weights(s.labels, s.n_classes), autocast)

    def describe(self) -> str:
        s = self.start
        return (f"finetune {self.cfg.model.arch} + linear head ({s.n_classes} classes, from {s.protocol}) on "
                f"{len(s.labels)} labelled images, backbone LR x{s.backbone_lr_scale:g}; ")


def finetune_config(arch: str, crop: int, mean: Sequence[float], std: Sequence[float], n_images: int,
                    stem_stride: int = 0, seed: int = 0, device: str = "cpu", minutes: float = 0.0,
                    epochs: float = 0.0, source: str = "", workers: int = 0, progress: bool = True,
                    base_lr: float = 0.5, overrides: Sequence[str] = ()) -> Config:
    """The run's config: a global batch of ``min(BATCH, n_images)``, ``VIEWS`` views at ``crop`` (random
    resized crop + flip only), fp32 eager, ``epochs`` (0: about ``STEPS`` steps) or ``minutes``, which
    comes first. ``overrides``: ``key=value`` pairs applied last."""
    cfg = Config()
    cfg.recipe = "finetune"
    cfg.seed, cfg.device = seed, device
    batch = max(1, min(BATCH, n_images))
    d = cfg.data
    d.source, d.batch_size, d.num_workers, d.limit = source, batch, workers, 0
    c = cfg.crops
    c.sizes, c.counts, c.min_scale, c.max_scale = [crop], [VIEWS], [MIN_SCALE], [1.0]
    c.flip_p, c.jitter_p, c.grayscale_p, c.blur_p = 0.5, 0.0, 0.0, 0.0
    c.mean, c.std = [float(v) for v in mean], [float(v) for v in std]
    cfg.swav.crops_for_assign = [0, 1]
    m = cfg.model
    m.arch, m.stem_stride, m.channels_last, m.compile, m.zero_init_last = arch, int(stem_stride), False, False, False
    o = cfg.optim
    steps_per_epoch = max(1, n_images // batch)
    o.epochs = float(epochs) if epochs else max(1.0, STEPS / steps_per_epoch)
    o.minutes, o.base_lr, o.precision = float(minutes), base_lr, "fp32"
    total = max(1, int(round(o.epochs * steps_per_epoch)))
    o.warmup_steps, o.weight_decay, o.final_lr_ratio, o.lars_trust = total // 10, 1e-4, 0.01, 0.1
    cfg.checkpoint.every, cfg.checkpoint.keep = 50, 2
    cfg.log.every, cfg.log.tensorboard, cfg.log.progress = 10, False, progress
    for text in overrides:
        merge(cfg, parse_override(text))
    cfg.validate()
    return cfg


__all__ = ["BACKBONE_LR_SCALE", "Classifier", "FinetuneMethod", "FinetuneStart", "FinetuneTraining",
           "class_weights", "finetune_config"]
