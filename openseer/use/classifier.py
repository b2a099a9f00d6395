"""A classifier from few labels: a backbone, a head and the class names, in one safetensors file.

``classifier.safetensors`` (written by ``openseer finetune``) holds the backbone's tensors under timm's
names, the head's tensors and metadata: ``format`` (openseer.classifier.v1), the architecture, the
eval transform (crop, mean/std, stem stride), the feature ``layer``, the class names in order, the
protocol and its head keys. A linear head on the last stage is stored under timm's classifier name
(``head.fc`` for RegNet, ``fc`` for ResNet...), so ``timm.create_model(arch, num_classes=C)`` loads the
file's tensors as they are. A kNN head (the few-label
vote, or label spreading's pseudo-labelled pile) is stored as ``knn.bank`` (unit rows) and
``knn.labels``.

``head_module`` gives the head as a torch module (features -> class probabilities, what ``predict``
returns); ``classifier_net`` the whole classifier as one module (images -> logits, or a kNN head's
probabilities), which ``openseer export CLF`` writes in every format (``use/export.py``).
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
from ..eval.layers import LAST, feature_model, parse_layer
from ..fileio import usual_mode
from ..model.checkpoint_file import CheckpointError
from ..model.load import CLASSIFIER_FORMAT, weights_hash
from ..rundir import CLASSIFIER
from .metadata import file_metadata


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


def head_tensors(backbone: nn.Module, head: nn.Module, layer: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(the head's tensors under the names a classifier file uses, the metadata fields that say how to
    read them): a linear head on the last stage under timm's classifier name (``head.fc``, ``fc``...),
    on other stages as ``linear``; a kNN head as ``knn.bank`` / ``knn.labels``."""
    if isinstance(head, LinearProbs):
        prefix = _classifier_name(backbone) if layer == LAST else "linear"
        tensors = {f"{prefix}.weight": head.fc.weight, f"{prefix}.bias": head.fc.bias}
        kind = {"head": "linear", "head_prefix": prefix}
    else:
        tensors = {"knn.bank": head.bank, "knn.labels": head.labels}
        kind = {"head": "knn", "k": str(head.k), "temperature": str(head.temperature)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return tensors, kind | {"head_keys": json.dumps(sorted(tensors))}


def head_fields(classes: list[str], layer: str, protocol: str, kind: dict[str, str]) -> dict[str, str]:
    """The classifier's part of the one export metadata schema (``metadata.file_metadata`` adds it to
    the backbone's): class names in column order, their number, the feature layer, the protocol and
    the head's kind and keys."""
    return {"classes": json.dumps(list(classes)), "num_classes": str(len(classes)), "layer": layer,
            "protocol": protocol, **kind}


def save_classifier(out: str | Path, backbone: nn.Module, info: dict, head: nn.Module, classes: list[str],
                    layer: str, protocol: str, extra: dict | None = None) -> Path:
    """Write ``out`` (a folder: ``classifier.safetensors`` inside it) atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    extra_tensors, kind = head_tensors(backbone, head, layer)
    tensors.update(extra_tensors)
    about = {**info, "weights_hash": weights_hash(backbone)}  # the backbone saved (a full fine-tune trained it)
    meta = file_metadata({**about, "head_meta": head_fields(classes, layer, protocol, kind)})
    meta["stem_stride"] = str(int(info.get("stem_stride", 0)))
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


class Classify(nn.Module):
    """Features, then a head: normalised images (B, 3, H, W) -> the head's output (B, C)."""

    def __init__(self, features: nn.Module, head: nn.Module):
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def classifier_net(backbone: nn.Module, head: nn.Module, layer: str, arch: str = "the backbone") -> tuple[nn.Module, str]:
    """(the whole classifier as one module, what it outputs: 'logits' or 'probabilities').

    A linear head on the last stage becomes timm's own classifier (a copy of the backbone with
    ``reset_classifier(C)`` and the head's weights), whose output is the logits and whose state dict
    is what ``timm.create_model(arch, num_classes=C)`` holds. A linear head on other stages gives the
    logits too; a kNN head gives the vote's class probabilities (there are no logits), with the
    labelled bank inside the module. ``softmax(logits)`` is what ``predict`` returns.
    """
    import copy

    names = parse_layer(layer, backbone, arch)
    if isinstance(head, LinearProbs):
        if not names and hasattr(backbone, "reset_classifier"):
            net = copy.deepcopy(backbone)
            net.reset_classifier(head.fc.out_features)
            fc = net.get_classifier()
            if isinstance(fc, nn.Linear) and tuple(fc.weight.shape) == tuple(head.fc.weight.shape):
                with torch.no_grad():
                    fc.weight.copy_(head.fc.weight)
                    fc.bias.copy_(head.fc.bias)
                return net.eval(), "logits"
        return Classify(feature_model(backbone, names), copy.deepcopy(head.fc)).eval(), "logits"
    return Classify(feature_model(backbone, names), head).eval(), "probabilities"


def head_names(net: nn.Module) -> set[str]:
    """The state-dict names of the head's tensors in a ``classifier_net`` module (timm's classifier
    weights, or the ``Classify`` head's): what an exporter finds as the head's initializers."""
    if isinstance(net, Classify):
        return {f"head.{k}" for k in net.head.state_dict()}
    prefix = _classifier_name(net) + "."
    return {k for k in net.state_dict() if k.startswith(prefix)}
