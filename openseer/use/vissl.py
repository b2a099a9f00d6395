"""``openseer import-seer``: official SEER (VISSL) or timm weights -> an openseer backbone file.

The key mapping (VISSL's trunk and SwAV head <-> timm's RegNet and openseer's SwAV names) lives in
the model layer, ``openseer/model/vissl_layout.py``, so that ``pretrain --init`` reads SEER's files
with the same code; its names are re-exported here.

``import_weights(path, arch, out)`` reads a VISSL, timm or openseer file, maps it to timm names,
checks every key and shape against ``arch`` (a clear error names the first mismatch), and writes an
openseer backbone (.safetensors with timm names and metadata). With ``keep_head`` the SwAV
projection MLP and prototypes are kept too (SEER's released files have them): the file then holds
an openseer SwAV state (``backbone.*``, ``head.mlp.*``, ``prototypes.layer.weight``), which
``openseer.load`` reads as a backbone and ``pretrain --init`` reads whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..fileio import usual_mode
from ..model.backbone import BackboneError, build_backbone
from ..model.vissl_layout import (  # noqa: F401  (re-exported: import-seer's names)
    SWAV_HEAD_PREFIXES,
    WeightsImportError,
    _shapes,
    candidate_archs,
    guess_arch,
    is_swav_head_key,
    mismatch,
    read_weights,
    swav_head_shape,
    timm_key_to_vissl,
    to_vissl,
    vissl_head_to_openseer,
    vissl_key_to_timm,
    vissl_to_timm,
)

# SEER weights are RGB with ImageNet mean/std (docs/method.md §2) at 224 px.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SEER_INPUT = 224

def import_weights(path: str | Path, out: str | Path, arch: str | None = None,
                   input_size: int | None = None, mean: tuple[float, ...] | None = None,
                   std: tuple[float, ...] | None = None, keep_head: bool = False) -> dict:
    """Import a VISSL (SEER), timm or openseer weights file as an openseer backbone (.safetensors).

    The input size and mean/std recorded are the arguments, else what the file records (files
    exported by openseer), else SEER's: 224 px, ImageNet mean/std. ``keep_head``: keep the SwAV
    projection MLP and prototypes (an error when the file has none). Returns a summary: arch,
    layout, number of tensors, dropped keys, the head kept (its widths) and the output path.
    """
    from safetensors.torch import save_file

    path, out = Path(path).expanduser(), Path(out).expanduser()
    if out.suffix != ".safetensors":
        raise WeightsImportError(f"import-seer writes a .safetensors file; got {out}")
    raw, layout, dropped, meta, head = read_weights(path)
    if keep_head and not head:
        raise WeightsImportError(f"{path} has no SwAV head (projection MLP and prototypes) to keep; "
                                 f"import it without --keep-head")
    if layout == "vissl":
        state, origin = vissl_to_timm(raw)
        origin = {k: f"_feature_blocks.{v}" for k, v in origin.items()}
    else:
        state, origin = dict(raw), {}
        head = [k for k in state if k.startswith(("head.fc.", "fc.", "classifier."))]
        dropped += head
        for k in head:
            state.pop(k)
    arch = arch or meta.get("arch") or guess_arch(state)
    if not arch:
        raise WeightsImportError(f"{path}: no timm RegNet matches these {len(state)} tensors; pass --arch NAME "
                           f"(SEER: regnety_320, regnety_640, regnety_1280, regnety_2560, seer_regnet_10b)")
    try:
        model = build_backbone(arch, device="meta")
    except BackboneError as e:
        raise WeightsImportError(str(e)) from None
    problem = mismatch(state, _shapes(model), origin)
    if problem:
        hint = guess_arch(state)
        also = f"; the file matches {hint}" if hint and hint != arch else ""
        raise WeightsImportError(f"{path} ({layout} layout) does not match --arch {arch}: {problem}{also}")
    input_size = int(input_size or meta.get("crop_size") or SEER_INPUT)
    mean = tuple(mean or (json.loads(meta["mean"]) if "mean" in meta else IMAGENET_MEAN))
    std = tuple(std or (json.loads(meta["std"]) if "std" in meta else IMAGENET_STD))
    tensors = {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).contiguous()
               for k, v in state.items()}
    kept: dict = {}
    if keep_head:  # an openseer SwAV state: the backbone under backbone.*, the head under its own names
        kept = swav_head_shape(head)
        tensors = {**{f"backbone.{k}": v for k, v in tensors.items()},
                   **{k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).contiguous()
                      for k, v in head.items()}}
        dropped = [k for k in dropped if not is_swav_head_key(k)]
    info = {"format": "openseer.backbone.v1", "arch": arch, "crop_size": str(input_size),
            "input_size": json.dumps([3, input_size, input_size]), "mean": json.dumps(list(mean)),
            "std": json.dumps(list(std)), "source": str(path), "imported_from": layout,
            "dropped": json.dumps(dropped[:50])}
    if keep_head:
        info["swav_head"] = json.dumps(kept)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=info)
    usual_mode(tmp)
    tmp.replace(out)
    return {"out": str(out), "arch": arch, "layout": layout, "tensors": len(tensors), "dropped": dropped,
            "head": kept}
