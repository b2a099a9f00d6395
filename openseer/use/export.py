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
input size, mean/std, feature width, training config) travels inside each file: safetensors
metadata, a TorchScript extra file ``openseer.json``, ONNX ``metadata_props``.
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
    return meta


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
    stride = int(info.get("stem_stride") or 0)
    if stride:
        doc["openseer"] = {"stem_stride": stride,
                           "note": f"trained with the stem convolution at stride {stride}: after "
                                   f"timm.create_model, set the first Conv2d's stride to ({stride}, {stride})"}
    return doc


def save_timm_folder(model: torch.nn.Module, info: dict, out_dir: str | Path) -> str:
    """``model.safetensors`` + ``config.json`` in timm's hub layout: ``timm.create_model(
    'local-dir:OUT', pretrained=True)`` builds the model with openseer's input size and mean/std (the
    Hugging Face Hub takes the folder unchanged). Returns a note for a stem timm cannot express."""
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


def check_torchscript(model: torch.nn.Module, info: dict, path: str | Path, batch: int = 3) -> float:
    """Max |TorchScript - PyTorch| on a random batch of ``batch`` (another size than the trace's)."""
    import warnings

    x = _example(info, batch, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(path), map_location="cpu")
        with torch.inference_mode():
            got = loaded(x).float()
    return float((got - _reference(model, x)).abs().max())


def save_onnx(model: torch.nn.Module, info: dict, out_path: str | Path, opset: int | None = None) -> Path:
    """ONNX with a dynamic batch axis (input ``images``, output ``features``) and metadata_props."""
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
                              output_names=["features"], dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                              external_data=big, **kwargs)
        proto = onnx.load(str(tmp), load_external_data=False)
        onnx.helper.set_model_props(proto, file_metadata(info))
        onnx.save(proto, str(tmp))

    if big:  # external data lives beside the file under the final name
        write(out_path)
        return out_path
    return _atomic(out_path, write)


def check_onnx(model: torch.nn.Module, info: dict, path: str | Path, batch: int = 3) -> float | None:
    """Max |onnxruntime (CPU) - PyTorch| on a random batch; None when onnxruntime is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = _example(info, batch, 1)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    return float((torch.from_numpy(got).float() - _reference(model, x)).abs().max())


def save_vissl(model: torch.nn.Module, info: dict, out_path: str | Path) -> Path:
    """The backbone in VISSL's checkpoint layout (``classy_state_dict`` ... ``trunk``), as SEER released."""
    from .vissl import to_vissl

    state = to_vissl(model.state_dict(), info["arch"])
    state["openseer"] = file_metadata(info)
    return _atomic(Path(out_path), lambda tmp: torch.save(state, str(tmp)))


def export(source: str | Path, out_path: str | Path, fmt: str | None = None, arch: str | None = None,
           check: bool = True, opset: int | None = None) -> dict:
    """Export the backbone of ``source`` (run dir, checkpoint, exported file or timm name) to ``out_path``.

    Returns ``{"path", "format", "arch", "max_abs_diff", "max_abs_ref", ...}``; ``max_abs_diff`` is
    the largest difference from the PyTorch backbone for TorchScript and ONNX (None when not checked).
    """
    fmt = format_for(out_path, fmt)  # before Path() drops a folder's trailing slash
    out_path = Path(out_path)
    src = Path(str(source)).expanduser()
    if fmt == "safetensors" and not arch and src.is_dir():
        path = export_backbone(src, out_path)  # straight from the checkpoint (also sharded .dcp)
        return {"path": str(path), "format": fmt, "max_abs_diff": None}
    from ..model.load import load_backbone

    model, info = load_backbone(str(source), arch=arch)
    return export_model(model, info, out_path, fmt, check=check, opset=opset)


def export_model(model: torch.nn.Module, info: dict, out_path: str | Path, fmt: str | None = None,
                 check: bool = True, opset: int | None = None) -> dict:
    """Export an in-memory backbone with its ``load_backbone`` info (see ``export``)."""
    fmt = format_for(out_path, fmt)
    out_path = Path(out_path)
    model = model.float().cpu().eval()
    result: dict = {"path": str(out_path), "format": fmt, "arch": info["arch"], "max_abs_diff": None}
    if fmt == "safetensors":
        save_safetensors(model, info, out_path)
    elif fmt == "timm":
        result["note"] = save_timm_folder(model, info, out_path)
    elif fmt == "vissl":
        save_vissl(model, info, out_path)
    elif fmt == "torchscript":
        _, how = save_torchscript(model, info, out_path)
        result["method"] = how
        if check:
            result["max_abs_diff"] = check_torchscript(model, info, out_path)
    else:
        save_onnx(model, info, out_path, opset)
        if check:
            result["max_abs_diff"] = check_onnx(model, info, out_path)
            result["checked_with"] = "onnxruntime (CPU)" if result["max_abs_diff"] is not None else "not checked: onnxruntime missing"
    if result["max_abs_diff"] is not None:
        result["max_abs_ref"] = float(_reference(model, _example(info, 3, 1)).abs().max())
    return result
