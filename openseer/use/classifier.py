"""A classifier from few labels: a backbone, a head and the class names, in one safetensors file.

``classifier.safetensors`` (written by ``openseer finetune``) holds the backbone's tensors under timm's
names, the head's tensors and metadata: ``format`` (openseer.classifier.v1), the architecture, the
eval transform (crop, mean/std, stem stride), the feature ``layer``, the class names in order, the
protocol and its head keys. A linear head on the last stage is stored under timm's classifier name
(``head.fc`` for RegNet, ``fc`` for ResNet...), so ``timm.create_model(arch, num_classes=C)`` loads the
file's tensors as they are. A kNN head (the few-label
vote, or label spreading's pseudo-labelled pile) is stored as ``knn.bank`` (unit rows) and
``knn.labels``.

``Head`` is the head as a torch module, features -> class probabilities, so the whole classifier can
be exported (TorchScript, ONNX) like a backbone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..eval.fewlabels import KnnHead, LinearHead
from ..eval.knn import TEMPERATURE
from ..fileio import usual_mode
from ..model.checkpoint_file import CheckpointError
from ..model.load import CLASSIFIER_FORMAT
from ..rundir import CLASSIFIER


class LinearProbs(nn.Module):
    """softmax(x W^T + b) on the raw features."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc(x.float()), dim=1)


class KnnProbs(nn.Module):
    """The weighted cosine kNN vote (votes exp((sim - 1) / T) over the k nearest bank rows), normalised."""

    def __init__(self, bank: torch.Tensor, labels: torch.Tensor, n_classes: int, k: int, temperature: float = TEMPERATURE):
        super().__init__()
        self.register_buffer("bank", bank.float())
        self.register_buffer("labels", labels.long())
        self.n_classes, self.k, self.temperature = n_classes, min(k, len(bank)), temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sims = F.normalize(x.float(), dim=1) @ self.bank.t()
        top, idx = sims.topk(self.k, dim=1)
        w = torch.exp((top - 1.0) / self.temperature)
        scores = torch.zeros(x.shape[0], self.n_classes, device=x.device).scatter_add(1, self.labels[idx], w)
        return scores / scores.sum(dim=1, keepdim=True).clamp_min(1e-30)


def head_module(head: LinearHead | KnnHead) -> nn.Module:
    """A fitted few-label head as a torch module: features -> class probabilities."""
    if isinstance(head, LinearHead):
        w, b = head.folded()
        return LinearProbs(torch.from_numpy(w), torch.from_numpy(b))
    return KnnProbs(torch.from_numpy(np.asarray(head.bank, np.float32)), torch.from_numpy(np.asarray(head.labels)),
                    head.n_classes, head.k)


def _classifier_name(backbone: nn.Module) -> str:
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    name = cfg.get("classifier")
    return name if isinstance(name, str) and name else "fc"


def save_classifier(out: str | Path, backbone: nn.Module, info: dict, head: nn.Module, classes: list[str],
                    layer: str, protocol: str, extra: dict | None = None) -> Path:
    """Write ``out`` (a folder: ``classifier.safetensors`` inside it) atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    if isinstance(head, LinearProbs):
        prefix = _classifier_name(backbone) if layer == "last" else "linear"
        head_tensors = {f"{prefix}.weight": head.fc.weight, f"{prefix}.bias": head.fc.bias}
        kind = {"head": "linear", "head_prefix": prefix}
    else:
        head_tensors = {"knn.bank": head.bank, "knn.labels": head.labels}
        kind = {"head": "knn", "k": str(head.k), "temperature": str(head.temperature)}
    tensors.update({k: v.detach().cpu().contiguous() for k, v in head_tensors.items()})
    meta = {"format": CLASSIFIER_FORMAT, "arch": str(info["arch"]), "crop_size": str(int(info["crop_size"])),
            "mean": json.dumps(list(info["mean"])), "std": json.dumps(list(info["std"])),
            "stem_stride": str(int(info.get("stem_stride", 0))), "layer": layer, "classes": json.dumps(classes),
            "protocol": protocol, "head_keys": json.dumps(sorted(head_tensors)),
            "feature_dim": str(int(info.get("feature_dim", 0))), **kind}
    if isinstance(info.get("config"), dict):
        meta["config"] = json.dumps(info["config"])
    if extra:
        meta["about"] = json.dumps(extra)
    path = out / CLASSIFIER
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    usual_mode(tmp)
    tmp.replace(path)
    return path


def classifier_meta(path: str | Path) -> dict:
    """A classifier file's metadata (no tensors read)."""
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def read_head(path: str | Path) -> tuple[nn.Module, list[str], dict]:
    """(head module, class names, metadata) of a classifier file."""
    path = Path(path)
    meta = classifier_meta(path)
    if meta.get("format") != CLASSIFIER_FORMAT:
        raise CheckpointError(f"{path} is not an openseer classifier (no {CLASSIFIER_FORMAT} metadata)")
    tensors = load_file(str(path))
    classes = json.loads(meta["classes"])
    if meta.get("head") == "linear":
        p = meta["head_prefix"]
        head: nn.Module = LinearProbs(tensors[f"{p}.weight"], tensors[f"{p}.bias"])
    else:
        head = KnnProbs(tensors["knn.bank"], tensors["knn.labels"], len(classes), int(meta.get("k", 20)),
                        float(meta.get("temperature", TEMPERATURE)))
    return head.eval(), classes, meta
