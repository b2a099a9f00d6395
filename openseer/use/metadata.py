"""The one export metadata schema: what every exported file says about itself.

Every export (safetensors metadata, the TorchScript extra file ``openseer.json``, ONNX
``metadata_props``, the ``openseer`` entry of a VISSL file, a classifier file from ``openseer
finetune``) carries the same string fields: the architecture, the input size, mean/std and stem
stride of the eval transform, the feature width, the source, the weights' hash and the training
config. A classifier adds its part (``use/classifier.py head_fields``): ``classes`` (JSON, in
column order), ``num_classes``, the feature ``layer``, the ``protocol``, the ``head`` kind and its
tensors' names, and ``format`` becomes ``openseer.classifier.v1``. ``config.json`` of timm's hub
layout (``export.timm_config``) says the same in timm's terms.
"""

from __future__ import annotations

import json

from ..model.load import CLASSIFIER_FORMAT


def file_metadata(info: dict) -> dict[str, str]:
    """String metadata for an exported file: architecture, input size, normalisation, config."""
    crop = int(info["crop_size"])
    meta = {"format": "openseer.backbone.v1", "arch": str(info["arch"]), "crop_size": str(crop),
            "input_size": json.dumps([3, crop, crop]), "mean": json.dumps(list(info["mean"])),
            "std": json.dumps(list(info["std"])), "feature_dim": str(info.get("feature_dim", "")),
            "source": str(info.get("source", "")), "weights_hash": str(info.get("weights_hash", "")),
            "step": str(info.get("step", "")), "input": "float32 (B, 3, H, W), RGB in [0, 1] then "
                                                       "(x - mean) / std", "output": "pooled features (B, D)"}
    if isinstance(info.get("config"), dict):
        meta["config"] = json.dumps(info["config"])
    if info.get("stem_stride"):
        meta["stem_stride"] = str(info["stem_stride"])  # not timm's default: build with this stem stride
    head = info.get("head_meta")
    if head:  # a classifier: backbone + head + class names (use/classifier.py head_fields)
        meta.update({k: str(v) for k, v in head.items()})
        meta["format"] = CLASSIFIER_FORMAT
        meta["output"] = ("class probabilities (B, C) of the kNN vote, columns in `classes` order"
                          if head.get("head") == "knn" else
                          "logits (B, C), columns in `classes` order; softmax gives predict's probabilities")
    return meta


def output_name(info: dict) -> str:
    """What a TorchScript/ONNX export outputs: 'features', or a classifier's 'logits' / 'probabilities'."""
    head = info.get("head_meta")
    if not head:
        return "features"
    return "probabilities" if head.get("head") == "knn" else "logits"
