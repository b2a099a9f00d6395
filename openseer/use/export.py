"""Export a backbone: safetensors with timm key names, TorchScript, ONNX, or VISSL's layout.

``export_backbone(run_dir_or_checkpoint, out_path)`` takes the latest checkpoint of a run (a whole
``.pt`` or a sharded ``.dcp`` from FSDP, consolidated here in one process), keeps the ``backbone.``
tensors, strips that prefix and writes them with metadata (architecture, crop size, mean/std, step,
the training config), so ``timm.create_model(arch, num_classes=0).load_state_dict(load_file(path))``
works as is (or ``pretrained=True, pretrained_cfg_overlay=dict(file=path)``), and ``openseer eval``
reads the file directly.

``export(source, out, fmt)`` does every format from any weights ``load_backbone`` understands (run
dir, checkpoint, exported file, timm name). TorchScript and ONNX files map normalised images
(B, 3, H, W) float32 to pooled features (B, D), with a dynamic batch; after writing, each is run
again (``torch.jit.load``; onnxruntime on CPU) on a batch of a different size and compared with
the PyTorch backbone: the maximum absolute difference is returned. The metadata (architecture,
input size, mean/std, feature width, training config; ``use/metadata.py``) travels inside each
file: safetensors metadata, a TorchScript extra file ``openseer.json``, ONNX ``metadata_props``.

A classifier from ``openseer finetune`` (``export_classifier``) is exported whole: backbone, head and
class names. safetensors and timm's folder hold timm's classifier (``num_classes``, ``label_names``
in ``config.json``); TorchScript and ONNX output its logits (a kNN head: the vote's probabilities,
the bank inside), checked against PyTorch with the top-1 agreement beside the max difference.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..config import config_from_dict
from ..eval.common import RESIZE_RATIO
from ..fileio import atomic_write_text, usual_mode
from ..model.checkpoint_file import (  # noqa: F401
    PREFIX,
    CheckpointError,
    backbone_tensors,
    latest_checkpoint,
    load_checkpoint,
)
from .metadata import file_metadata, output_name


def export_backbone(source: str | Path, out_path: str | Path) -> Path:
    """Write the backbone of ``source`` (a run directory or one checkpoint) to ``out_path`` (.safetensors)."""
    import warnings

    from safetensors.torch import save_file

    source, out_path = Path(source), Path(out_path)
    if out_path.suffix != ".safetensors":
        raise CheckpointError(f"export writes a .safetensors file; got {out_path}")
    if source.is_dir() and source.suffix != ".dcp":
        path, state = latest_checkpoint(source, shallow=True)
    else:
        path, state = source, load_checkpoint(source, shallow=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        tensors = backbone_tensors(path, state)
    meta = {"format": "openseer.backbone.v1", "source": str(path), "step": str(state.get("step", ""))}
    if isinstance(state.get("config"), dict):
        cfg = config_from_dict(state["config"])
        crop = cfg.crops.sizes[0]
        meta.update(arch=cfg.model.arch, crop_size=str(crop), input_size=json.dumps([3, crop, crop]),
                    mean=json.dumps(list(cfg.crops.mean)),
                    std=json.dumps(list(cfg.crops.std)), config=json.dumps(state["config"]),
                    stem_stride=str(cfg.model.stem_stride))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(out_path)
    return out_path


# ---------------------------------------------------------------- every format

FORMATS = ("safetensors", "torchscript", "onnx", "vissl", "timm")
_SUFFIXES = {".safetensors": "safetensors", ".pt": "torchscript", ".ts": "torchscript", ".torchscript": "torchscript",
             ".jit": "torchscript", ".onnx": "onnx", ".torch": "vissl", ".pth": "vissl"}


def format_for(out_path: str | Path, fmt: str | None = None) -> str:
    """``fmt`` if given (checked), else the format the file name implies."""
    if fmt:
        if fmt not in FORMATS:
            raise CheckpointError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
        return fmt
    suffix = Path(out_path).suffix.lower()
    if not suffix and (str(out_path).endswith("/") or Path(out_path).is_dir()):
        return "timm"  # a folder: timm's hub layout
    if suffix not in _SUFFIXES:
        raise CheckpointError(f"cannot tell the export format from {out_path}: pass --format "
                              f"({', '.join(FORMATS)}) or name the file .safetensors/.pt/.onnx/.torch (or a folder/ for timm's layout)")
    return _SUFFIXES[suffix]


def timm_config(model: torch.nn.Module, info: dict) -> dict:
    """``config.json`` in timm's hub layout: the architecture and the ``pretrained_cfg`` that
    ``timm.data.resolve_data_config`` reads, so timm's own ``create_transform`` reproduces openseer's
    eval transform (shorter side to 1.14 x crop, centre crop, the training mean/std)."""
    crop = int(info["crop_size"])
    short = int(math.floor(crop * RESIZE_RATIO + 0.5))
    base = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg = {"input_size": [3, crop, crop], "fixed_input_size": False, "interpolation": "bilinear",
           "crop_pct": round(crop / (short + 0.25), 6),  # timm resizes to floor(crop / crop_pct) = short
           "crop_mode": "center", "mean": list(info["mean"]), "std": list(info["std"]), "num_classes": 0,
           "first_conv": base.get("first_conv"), "classifier": base.get("classifier")}
    doc = {"architecture": info["arch"], "num_classes": 0, "num_features": int(info.get("feature_dim") or 0),
           "pretrained_cfg": {k: v for k, v in cfg.items() if v is not None}}
    head = info.get("head_meta")
    if head:  # a classifier: timm builds the head (num_classes) and names the columns (label_names)
        classes = json.loads(head["classes"])
        doc["num_classes"] = doc["pretrained_cfg"]["num_classes"] = len(classes)
        doc["label_names"] = classes  # timm's own field (push_to_hf_hub writes it so): pretrained_cfg.label_names
        doc["pretrained_cfg"]["classifier"] = head.get("head_prefix", cfg["classifier"])
    stride = int(info.get("stem_stride") or 0)
    if stride:
        doc["openseer"] = {"stem_stride": stride,
                           "note": f"trained with the stem convolution at stride {stride}: after "
                                   f"timm.create_model, set the first Conv2d's stride to ({stride}, {stride})"}
    return doc


def save_timm_folder(model: torch.nn.Module, info: dict, out_dir: str | Path) -> str:
    """``model.safetensors`` + ``config.json`` in timm's hub layout: ``timm.create_model(
    'local-dir:OUT', pretrained=True)`` builds the model with openseer's input size and mean/std (the
    Hugging Face Hub takes the folder unchanged); for a classifier (``model`` is timm's model with its
    head), with ``num_classes`` and the class names as ``pretrained_cfg['label_names']``. Returns a
    note for a stem timm cannot express."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(model, info, out_dir / "model.safetensors")
    doc = timm_config(model, info)
    atomic_write_text(out_dir / "config.json", json.dumps(doc, indent=2) + "\n")
    return doc.get("openseer", {}).get("note", "")


def _atomic(out_path: Path, write) -> Path:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp" + out_path.suffix)
    write(tmp)
    usual_mode(tmp)
    tmp.replace(out_path)
    return out_path


def save_safetensors(model: torch.nn.Module, info: dict, out_path: str | Path) -> Path:
    """A loaded backbone (``load_backbone``) as safetensors with timm names and metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return _atomic(Path(out_path), lambda tmp: save_file(tensors, str(tmp), metadata=file_metadata(info)))


def _example(info: dict, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    crop = int(info["crop_size"])
    return torch.randn(batch, 3, crop, crop, generator=g)


def _reference(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x).float()


def save_torchscript(model: torch.nn.Module, info: dict, out_path: str | Path) -> tuple[Path, str]:
    """(path, 'script' or 'trace'): ``torch.jit.script`` when the model allows it, else a trace."""
    import warnings

    model = model.eval()
    extra = {"openseer.json": json.dumps(file_metadata(info))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream but still the portable format
        try:
            scripted, how = torch.jit.script(model), "script"
        except Exception:
            with torch.no_grad():
                scripted, how = torch.jit.trace(model, _example(info, 2, 0), check_trace=False), "trace"
        path = _atomic(Path(out_path), lambda tmp: torch.jit.save(scripted, str(tmp), _extra_files=extra))
    return path, how


def _torchscript_outputs(path: str | Path, x: torch.Tensor) -> torch.Tensor:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(path), map_location="cpu")
        with torch.inference_mode():
            return loaded(x).float()


def check_torchscript(model: torch.nn.Module, info: dict, path: str | Path, batch: int = 3) -> float:
    """Max |TorchScript - PyTorch| on a random batch of ``batch`` (another size than the trace's)."""
    x = _example(info, batch, 1)
    return float((_torchscript_outputs(path, x) - _reference(model, x)).abs().max())


def save_onnx(model: torch.nn.Module, info: dict, out_path: str | Path, opset: int | None = None) -> Path:
    """ONNX with a dynamic batch axis (input ``images``, output ``features``, or a classifier's
    ``logits`` / ``probabilities``) and metadata_props."""
    import contextlib
    import io
    import warnings

    try:
        import onnx
    except ImportError:
        raise CheckpointError("ONNX export needs the onnx and onnxscript packages: pip install 'openseer[onnx]'") from None
    out_path = Path(out_path)
    x = _example(info, 2, 0)
    big = sum(p.numel() for p in model.parameters()) * 4 > 1_800_000_000  # protobuf's 2 GB limit
    kwargs = {"opset_version": opset} if opset else {}

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model.eval(), (x,), str(tmp), dynamo=True, input_names=["images"],
                              output_names=[output_name(info)], dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                              external_data=big, **kwargs)
        proto = onnx.load(str(tmp), load_external_data=False)
        onnx.helper.set_model_props(proto, file_metadata(info))
        onnx.save(proto, str(tmp))

    if big:  # external data lives beside the file under the final name
        write(out_path)
        return out_path
    return _atomic(out_path, write)


def _onnx_outputs(path: str | Path, x: torch.Tensor) -> torch.Tensor | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]).float()


def check_onnx(model: torch.nn.Module, info: dict, path: str | Path, batch: int = 3) -> float | None:
    """Max |onnxruntime (CPU) - PyTorch| on a random batch; None when onnxruntime is not installed."""
    x = _example(info, batch, 1)
    got = _onnx_outputs(path, x)
    return None if got is None else float((got - _reference(model, x)).abs().max())


def save_vissl(model: torch.nn.Module, info: dict, out_path: str | Path) -> Path:
    """The backbone in VISSL's checkpoint layout (``classy_state_dict`` ... ``trunk``), as SEER released."""
    from .vissl import to_vissl

    state = to_vissl(model.state_dict(), info["arch"])
    state["openseer"] = file_metadata(info)
    return _atomic(Path(out_path), lambda tmp: torch.save(state, str(tmp)))


def export(source: str | Path, out_path: str | Path, fmt: str | None = None, arch: str | None = None,
           check: bool = True, opset: int | None = None, backbone_only: bool = False) -> dict:
    """Export ``source`` (run dir, checkpoint, exported file, timm name, or a classifier from
    ``openseer finetune``) to ``out_path``: a backbone, or a classifier whole (``export_classifier``)
    unless ``backbone_only``.

    Returns ``{"path", "format", "arch", "max_abs_diff", "max_abs_ref", ...}``; ``max_abs_diff`` is
    the largest difference from the PyTorch model for TorchScript and ONNX (None when not checked).
    """
    from ..rundir import CLASSIFIER, is_run

    fmt = format_for(out_path, fmt)  # before Path() drops a folder's trailing slash
    out_path = Path(out_path)
    src = Path(str(source)).expanduser()
    if (fmt == "safetensors" and not arch and src.is_dir() and not (src / CLASSIFIER).is_file()
            and (src.suffix == ".dcp" or is_run(src))):
        path = export_backbone(src, out_path)  # straight from the checkpoint (also sharded .dcp)
        return {"path": str(path), "format": fmt, "max_abs_diff": None}
    from ..model.load import load_backbone

    model, info = load_backbone(str(source), arch=arch)
    return export_model(model, info, out_path, fmt, check=check, opset=opset, backbone_only=backbone_only)


def export_model(model: torch.nn.Module, info: dict, out_path: str | Path, fmt: str | None = None,
                 check: bool = True, opset: int | None = None, backbone_only: bool = False) -> dict:
    """Export an in-memory backbone with its ``load_backbone`` info (see ``export``); when the info
    names a classifier file (``openseer.load(CLF)``), the whole classifier unless ``backbone_only``."""
    fmt = format_for(out_path, fmt)
    if info.get("classifier") and not backbone_only:
        return export_classifier(model, info, out_path, fmt, check=check, opset=opset)
    out_path = Path(out_path)
    model = model.float().cpu().eval()
    result: dict = {"path": str(out_path), "format": fmt, "arch": info["arch"], "max_abs_diff": None}
    if fmt == "safetensors":
        save_safetensors(model, info, out_path)
    elif fmt == "timm":
        result["note"] = save_timm_folder(model, info, out_path)
    elif fmt == "vissl":
        save_vissl(model, info, out_path)
    else:
        result.update(_save_checked(model, info, out_path, fmt, check, opset))
    return result


def _save_checked(model: torch.nn.Module, info: dict, out_path: Path, fmt: str, check: bool,
                  opset: int | None) -> dict:
    """Write TorchScript or ONNX, then run the file on a random batch of another size and compare it
    with ``model``: max |difference|, the reference's max |value|, and for a classifier the share of
    rows whose top-1 class agrees."""
    result: dict = {"max_abs_diff": None}
    x = _example(info, 3, 1)
    if fmt == "torchscript":
        _, result["method"] = save_torchscript(model, info, out_path)
        got = _torchscript_outputs(out_path, x) if check else None
    else:
        save_onnx(model, info, out_path, opset)
        got = _onnx_outputs(out_path, x) if check else None
        if check:
            result["checked_with"] = "onnxruntime (CPU)" if got is not None else "not checked: onnxruntime missing"
    if got is not None:
        ref = _reference(model, x)
        result.update(max_abs_diff=float((got - ref).abs().max()), max_abs_ref=float(ref.abs().max()))
        if info.get("head_meta"):
            result["top1_agreement"] = float((got.argmax(1) == ref.argmax(1)).float().mean())
    return result


# ---------------------------------------------------------------- a classifier, whole


def classifier_parts(backbone: torch.nn.Module, info: dict) -> tuple[torch.nn.Module, dict, dict[str, torch.Tensor]]:
    """(the whole classifier as one module, ``info`` with its ``head_meta``, the head's tensors) for a
    backbone loaded from a classifier file (``info['classifier']``)."""
    from .classifier import classifier_net, head_fields, head_tensors, read_head

    head, classes, meta = read_head(info["classifier"])
    layer = meta.get("layer", "last")
    backbone = backbone.float().cpu().eval()
    net, _ = classifier_net(backbone, head, layer, info["arch"])
    tensors, kind = head_tensors(backbone, head, layer)
    fields = head_fields(classes, layer, meta.get("protocol", ""), kind)
    if meta.get("about"):  # finetune's estimate travels with the classifier
        fields["about"] = meta["about"]
    return net, {**info, "head_meta": fields}, tensors


def export_classifier(backbone: torch.nn.Module, info: dict, out_path: str | Path, fmt: str | None = None,
                      check: bool = True, opset: int | None = None) -> dict:
    """Export a classifier (backbone + head + class names) whole.

    safetensors: the backbone under timm's names, the head under timm's classifier name (``head.fc``
    for RegNet, ``fc`` for ResNet) when it is linear on the last stage, else as the classifier file
    holds it, and the class names in the metadata; ``timm``: that file plus ``config.json`` with
    ``num_classes`` and ``label_names``; TorchScript and ONNX: images -> logits (a linear head) or
    class probabilities (a kNN head, with its labelled bank inside), checked against PyTorch (max
    |difference| and top-1 agreement). VISSL's layout holds backbones only.
    """
    fmt = format_for(out_path, fmt)
    out_path = Path(out_path)
    net, info, tensors = classifier_parts(backbone, info)
    head = info["head_meta"]
    classes = json.loads(head["classes"])
    result: dict = {"path": str(out_path), "format": fmt, "arch": info["arch"], "max_abs_diff": None,
                    "classifier": True, "classes": classes, "head": head["head"], "layer": head["layer"],
                    "output": output_name(info)}
    timm_head = head["head"] == "linear" and head["layer"] == "last" and set(tensors) <= set(net.state_dict())
    if fmt == "vissl":
        raise CheckpointError("VISSL's layout holds a backbone, not a classifier: add --backbone-only to export "
                              "the backbone, or choose safetensors, timm, torchscript or onnx for the whole classifier")
    if fmt == "timm" and not timm_head:
        what = "a kNN head" if head["head"] == "knn" else f"a linear head on layer {head['layer']}"
        raise CheckpointError(f"this classifier has {what}, which timm's models cannot express (timm's classifier "
                              f"is linear on the pooled last stage): export it as safetensors (openseer.load reads "
                              f"it), torchscript or onnx, or add --backbone-only for timm's layout of the backbone")
    if fmt == "safetensors":
        state = {k: v.detach().cpu().contiguous() for k, v in backbone.float().cpu().state_dict().items()}
        state.update(tensors)
        from safetensors.torch import save_file

        _atomic(out_path, lambda tmp: save_file(state, str(tmp), metadata=file_metadata(info)))
    elif fmt == "timm":
        result["note"] = save_timm_folder(net, info, out_path)
    else:
        result.update(_save_checked(net, info, out_path, fmt, check, opset))
    return result
