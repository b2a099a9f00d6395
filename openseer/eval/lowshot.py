"""Low-shot evaluation: fixed, seeded, stratified label subsets, and full fine-tuning on them.

A subset takes, in each class, the first images of a seeded order that depends only on the image
keys and the seed, so it is identical across runs, machines and models; it is saved as a JSON
split file next to eval.json. Fine-tuning follows SwAV's semi-supervised protocol: the whole
backbone with a small LR, a new head (a non-affine BatchNorm scaled to unit norm, then a linear
layer) with a much larger one (25x by default), light augmentation (flips; a random resized crop
when ``min_scale`` < 1), cosine LR. The supervised-from-scratch baseline uses the same loop and budget.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from ..data.multicrop import sample_crop_boxes
from ..model.backbone import build_backbone, feature_dim
from ..progress import progress as progress_bar
from .common import EvalTransform, Labelled, load_batch, stratified_take
from .knn import ranked_accuracy

SPLIT_FORMAT = "openseer.lowshot-split.v1"


def split_name(percent: float | None = None, per_class: int | None = None) -> str:
    return f"{percent:g}pct" if percent is not None else f"{per_class}perclass"


def lowshot_splits(train: Labelled, classes: list[str], seed: int, percents: tuple[float, ...] = (1, 10),
                   per_class: tuple[int, ...] = (), skipped: dict[str, str] | None = None) -> dict[str, dict]:
    """{name: {"indices", "rule"}} for each percentage (at least one image per class) and each N per class.

    A small set is named by what it holds: a percentage that rounds to one image in every class is the
    ``1perclass`` split (``1/class`` in tables, not "1%"). A percentage whose subset is every training
    image, or the same images as a split already made, is left out; ``skipped`` (when given) gets its
    name and why."""
    out: dict[str, dict] = {}
    counts = np.bincount(train.labels, minlength=len(classes))
    present = counts[counts > 0]

    def skip(name: str, why: str) -> None:
        if skipped is not None:
            skipped[name] = why

    for p in percents:
        exact = p / 100 * present
        take = np.maximum(1, np.round(exact)).astype(int)
        if (take >= present).all():
            skip(split_name(percent=p), f"{p:g}% of each class is every training image ({int(present.sum())}): "
                                        f"the 100% rows already say it")
            continue
        idx = stratified_take(train.labels, train.keys, seed, fraction=p / 100, classes=classes,
                              what=f"the {p:g}% split")
        raised = int((np.round(exact) < 1).sum())
        if (take == 1).all() and raised:
            name, rule = split_name(per_class=1), (f"1 image of each class ({p:g}% of each class rounds to less "
                                                   f"than 1 in {raised} of {len(present)} classes)")
        else:
            name = split_name(percent=p)
            rule = f"{p:g}% of each class (rounded, at least 1)" + (
                f"; {raised} of {len(present)} classes raised to 1 image ({len(idx)} images, "
                f"{100 * len(idx) / present.sum():.1f}% of train)" if raised else "")
        same = next((n for n, sp in out.items() if np.array_equal(sp["indices"], idx)), None)
        if same is not None:
            skip(split_name(percent=p), f"{p:g}% of each class gives the same {len(idx)} images as the {same} split")
            continue
        out[name] = {"indices": idx, "rule": rule}
    for n in per_class:
        idx = stratified_take(train.labels, train.keys, seed, per_class=n, classes=classes,
                              what=f"the {n}-per-class split")
        name = split_name(per_class=n)
        if name in out:
            skip(f"{name} (--per-class {n})", f"the same images as the {name} split")
            continue
        out[name] = {"indices": idx, "rule": f"{n} images of each class"}
    return out


def save_split(folder: Path, name: str, split: dict, train: Labelled, data_name: str, fingerprint: str,
               seed: int) -> Path:
    """Write ``lowshot-<name>-seed<seed>.json`` (train indices and keys) into ``folder``."""
    idx = split["indices"]
    counts = np.bincount(train.labels[idx]).tolist()
    doc = {"format": SPLIT_FORMAT, "data": data_name, "train_fingerprint": fingerprint, "seed": seed,
           "name": name, "rule": split["rule"], "order": "sha1(f'{seed}:{key}') within each class",
           "n": int(len(idx)), "per_class_counts": counts,
           "indices": [int(i) for i in idx], "keys": [train.keys[int(i)] for i in idx]}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"lowshot-{name}-seed{seed}.json"
    path.write_text("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in doc.items()) + "\n}\n")
    return path


@dataclass
class FinetuneSettings:
    """One budget for fine-tuning and for the supervised-from-scratch baseline."""

    epochs: int = 10
    batch_size: int = 64
    # Measured on Fashion-MNIST 10% / 1% of labels, a tiny-cpu 15-minute checkpoint, 5k test images
    # (docs/benchmarks.md): backbone LR 0.05 -> 0.2 and crop scale 0.35 -> 1.0 took the 10% fine-tune
    # from 72.1 to 83.0 and the 1% one from about 72.7 to 77.0; short pretraining leaves features that
    # need adapting.
    lr_backbone: float = 0.2
    lr_head: float = 5.0  # 25x the backbone's (the head's inputs have norm ~1: see ClassifierHead)
    lr_scratch: float = 0.2  # the backbone's LR when training from scratch (the head keeps lr_head)
    weight_decay: float = 1e-4
    momentum: float = 0.9
    min_scale: float = 1.0  # random resized crop scale min_scale..1; 1.0 = the whole image, flips only
    flip_p: float = 0.5


def auto_epochs(n_images: int, budget_images: int = 60000, max_epochs: int = 50) -> int:
    """Epochs so that about ``budget_images`` images are seen (at least 1, at most ``max_epochs``)."""
    return int(min(max_epochs, max(1, round(budget_images / max(1, n_images)))))


def augment(x: torch.Tensor, transform: EvalTransform, s: FinetuneSettings, gen: torch.Generator) -> torch.Tensor:
    """Random resized crop (scale min_scale..1) + horizontal flip of float images (B, 3, S, S), normalised."""
    n, _, h, w = x.shape
    boxes = sample_crop_boxes(n, h, w, (s.min_scale, 1.0), gen)
    rois = torch.cat([torch.arange(n, dtype=torch.float32)[:, None], boxes], 1)
    x = roi_align(x, rois, output_size=transform.crop, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    flip = torch.rand(n, generator=gen) < s.flip_p
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return transform.normalize(x)


class ClassifierHead(nn.Module):
    """BatchNorm (no affine), divided by sqrt(D), then a linear layer.

    Each input then has norm ~1 whatever the scale of the backbone's features (which differs wildly
    between trained and random weights), so the head's LR means the same for every model: one SGD
    step moves a sample's logits by about the LR.
    """

    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.scale = dim ** -0.5
        self.linear = nn.Linear(dim, n_classes)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x) * self.scale)


@torch.inference_mode()
def classify(model: nn.Module, head: nn.Module, data: Labelled, transform: EvalTransform,
             device: torch.device, batch_size: int = 256) -> list[float]:
    """Top-1 / top-5 (percent) of backbone + head on ``data`` with the eval transform."""
    model.eval()
    head.eval()
    ranked = []
    for a in range(0, len(data), batch_size):
        x = transform.normalize(load_batch(data, np.arange(a, min(len(data), a + batch_size)), transform))
        logits = head(model(x.to(device).contiguous(memory_format=torch.channels_last)))
        ranked.append(logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu())
    return ranked_accuracy(torch.cat(ranked), data.labels)


def finetune(backbone: nn.Module | None, arch: str, train: Labelled, test: Labelled,
             transform: EvalTransform, n_classes: int, settings: FinetuneSettings, seed: int = 0,
             device: str | torch.device = "cpu", progress: bool = True, desc: str = "fine-tune",
             stem_stride: int = 0) -> dict:
    """Fine-tune ``backbone`` (or, with ``backbone=None``, train ``arch`` from scratch) plus a new
    linear head on ``train``; returns top-1/top-5 on ``test`` and the protocol."""
    device = torch.device(device)
    scratch = backbone is None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_backbone(arch, stem_stride=stem_stride) if scratch else copy.deepcopy(backbone)
        head = ClassifierHead(feature_dim(model), n_classes)
    model = model.to(device).to(memory_format=torch.channels_last).train()
    head = head.to(device).train()
    s = settings
    lr_bb, lr_head = (s.lr_scratch if scratch else s.lr_backbone), s.lr_head
    opt = torch.optim.SGD([{"params": model.parameters(), "lr": lr_bb, "base": lr_bb},
                           {"params": head.parameters(), "lr": lr_head, "base": lr_head}],
                          momentum=s.momentum, nesterov=True, weight_decay=s.weight_decay)
    n = len(train)
    bs = min(s.batch_size, n)
    per_epoch = max(1, n // bs)  # a last batch smaller than batch_size is dropped (BatchNorm needs > 1)
    total = per_epoch * s.epochs
    gen = torch.Generator().manual_seed(seed)
    y_all = torch.as_tensor(train.labels, dtype=torch.long)
    t0 = time.perf_counter()
    bar = progress_bar(desc, total=total, unit="step", enabled=progress, leave=False)
    losses = []
    step = 0
    for _ in range(s.epochs):
        perm = torch.randperm(n, generator=gen).numpy()
        for j in range(per_epoch):
            idx = np.sort(perm[j * bs:(j + 1) * bs])
            x = augment(load_batch(train, idx, transform), transform, s, gen).to(device)
            for g in opt.param_groups:
                g["lr"] = g["base"] * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(head(model(x.contiguous(memory_format=torch.channels_last))),
                                   y_all[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            bar.update(1)
            bar.postfix(loss=round(losses[-1], 3))
    bar.close()
    train_s = time.perf_counter() - t0
    top1, top5 = classify(model, head, test, transform, device)
    return {
        "top1": top1, "top5": top5, "epochs": s.epochs, "steps": total, "batch_size": bs,
        "images_seen": total * bs, "final_loss": float(np.mean(losses[-max(1, per_epoch):])) if losses else None,
        "lr_backbone": lr_bb, "lr_head": lr_head, "head": "BatchNorm1d (no affine) / sqrt(D) + Linear", "init": "random (timm default init)" if scratch else "pretrained",
        "optimizer": f"SGD nesterov {s.momentum}, weight decay {s.weight_decay:g}, cosine LR",
        "augmentation": f"random resized crop (scale {s.min_scale:g}-1) + flip p={s.flip_p:g}",
        "settings": asdict(s), "train_seconds": round(train_s, 2),
        "seconds": round(time.perf_counter() - t0, 2),
    }
