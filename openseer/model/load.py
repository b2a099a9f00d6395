"""One entry point for "which weights": a run directory, a checkpoint, an exported backbone (a file or
timm's hub folder), or a timm name.

``load_backbone`` returns the backbone (a timm model with ``num_classes=0``, eval mode) and an info
dict: the architecture, a hash of the weights (content, not file name, so a copied file is the
same model), and the training crop size and mean/std the eval transform must reuse.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import timm
import torch
from torch import nn

from ..config import (
    Config,
    ConfigError,
    build_config,
    channel_stats,
    config_from_dict,
    recipe_names,
    recipe_values,
)
from ..rundir import CKPT_DIR, CLASSIFIER, CONFIG, is_run
from .backbone import BackboneError, build_backbone, feature_dim
from .checkpoint_file import CheckpointError, backbone_tensors, latest_checkpoint, load_checkpoint

CLASSIFIER_FORMAT = "openseer.classifier.v1"


def weights_hash(model: nn.Module) -> str:
    """SHA-256 (first 16 hex) over every parameter and buffer: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        flat = t.detach().cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()[:16]


def default_transform(model: nn.Module, arch: str, recipe: str | None = None) -> dict:
    """Crop size and mean/std for a bare architecture: ``recipe`` if given, else the built-in recipe
    that trains this architecture (the default recipe, tiny-cpu, first where several do), else timm's
    pretrained config for it."""
    names = [recipe] if recipe else sorted((n for n in recipe_names()
                                            if recipe_values(n).get("model", {}).get("arch") == arch),
                                           key=lambda n: n != Config.recipe)[:1]
    if names:
        cfg = build_config(names[0])
        return {"crop_size": cfg.crops.sizes[0], "mean": list(cfg.crops.mean), "std": list(cfg.crops.std),
                "transform_from": f"recipe {names[0]}"}
    pc = getattr(model, "pretrained_cfg", None) or {}
    return {"crop_size": int(pc.get("input_size", (3, 224, 224))[-1]),
            "mean": list(pc.get("mean", (0.485, 0.456, 0.406))), "std": list(pc.get("std", (0.229, 0.224, 0.225))),
            "transform_from": "timm pretrained_cfg"}


def _from_config(cfg_dict: dict) -> dict:
    try:
        cfg = config_from_dict(cfg_dict)
    except ConfigError as e:
        raise CheckpointError(f"the checkpoint's config is not valid: {e}") from None
    return {"arch": cfg.model.arch, "stem_stride": cfg.model.stem_stride, "in_chans": cfg.model.in_chans,
            "crop_size": cfg.crops.sizes[0],
            "mean": channel_stats(cfg.crops.mean, cfg.model.in_chans),  # one value for a 1-channel backbone
            "std": channel_stats(cfg.crops.std, cfg.model.in_chans), "transform_from": "training config",
            "config": cfg_dict}


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in ("module.", "_orig_mod."):
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _backbone_state(state: dict) -> dict[str, torch.Tensor]:
    """The backbone's tensors with timm key names: a SwAV state dict's ``backbone.`` part, and
    ``module.`` (DDP) / ``_orig_mod.`` (torch.compile) prefixes removed."""
    tensors = {_strip(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("backbone.") for k in tensors):
        tensors = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
    return tensors


def _checkpoint(path: Path, state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Backbone tensors (timm names) and what the training config says, from a training checkpoint
    (a ``.pt`` or a sharded ``.dcp``, of which only the backbone's tensors are read)."""
    about = _from_config(state["config"]) if isinstance(state.get("config"), dict) else {}
    if "step" in state:
        about["step"] = int(state["step"])
    return backbone_tensors(path, state), about


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], arch: str, where: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} tensors of the wrong shape (e.g. {k}: file {tuple(state[k].shape)}, "
                         f"{arch} {tuple(own[k].shape)})")
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise BackboneError(f"the weights in {where} do not match backbone {arch}: {'; '.join(parts)}. "
                            f"Pass the architecture they were trained with (--backbone NAME)")
    model.load_state_dict(state, strict=True)


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict, str]:
    """(tensors, what the file says about itself, kind) for .safetensors, .pt checkpoints and state dicts."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable .safetensors file: {e}") from None
        about: dict = {}
        if "config" in meta:
            try:
                about = _from_config(json.loads(meta["config"]))
            except (json.JSONDecodeError, TypeError):
                pass
        if "arch" in meta:
            about["arch"] = meta["arch"]
        for key in ("crop_size", "step", "stem_stride"):
            if meta.get(key, "").isdigit():
                about[key] = int(meta[key])
        for key in ("mean", "std"):
            if key in meta:
                about[key] = [float(v) for v in json.loads(meta[key])]
        if meta.get("format") == CLASSIFIER_FORMAT:  # a classifier: its head is read by use/classifier.py
            head = set(json.loads(meta.get("head_keys", "[]")))
            tensors = {k: v for k, v in tensors.items() if k not in head}
            about["classifier"] = str(path)
        return _backbone_state(tensors), about, "safetensors"
    state = load_checkpoint(path, shallow=True)
    if isinstance(state.get("model"), dict):
        tensors, about = _checkpoint(path, state)
        return tensors, about, "checkpoint"
    if not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no tensors: expected an openseer checkpoint or a backbone state dict")
    return _backbone_state(state), {}, "state_dict"


TIMM_WEIGHTS = "model.safetensors"  # timm's hub layout: config.json + model.safetensors


def _timm_folder_arch(path: Path) -> str | None:
    """The architecture a timm hub folder's ``config.json`` names (None when it names none)."""
    try:
        arch = json.loads((path / "config.json").read_text()).get("architecture")
    except (OSError, ValueError, AttributeError):
        return None
    return arch if isinstance(arch, str) else None


def load_backbone(spec: str | None, random_init: bool = False, arch: str | None = None,
                  recipe: str | None = None, seed: int = 0) -> tuple[nn.Module, dict]:
    """(backbone in eval mode, info) for a run dir, checkpoint, exported file, or timm model name.

    ``arch`` (``--backbone``) names the architecture of files that do not say it, and must match
    what a checkpoint says. ``random_init`` keeps the architecture and transform but builds fresh
    weights (seeded, ``zero_init_last=False`` so features are not nearly constant).
    """
    path = Path(spec).expanduser() if spec else None
    about: dict = {}
    tensors = None
    if spec is None or spec == "":
        if not arch:
            raise BackboneError("give the weights to evaluate (run dir, checkpoint, exported file) or --backbone NAME")
        kind, where = "timm", arch
    elif path is not None and path.is_dir() and path.suffix == ".dcp":  # one sharded checkpoint
        tensors, about = _checkpoint(path, load_checkpoint(path, shallow=True))
        kind, where = "checkpoint", str(path)
    elif path is not None and path.is_dir() and (path / CLASSIFIER).is_file():  # openseer finetune's output
        tensors, about, kind = _read_file(path / CLASSIFIER)
        kind, where = "classifier", str(path / CLASSIFIER)
    elif path is not None and path.is_dir() and (path / TIMM_WEIGHTS).is_file() and not is_run(path):
        tensors, about, kind = _read_file(path / TIMM_WEIGHTS)  # timm's hub layout (openseer export --format timm)
        if not about.get("arch"):
            about["arch"] = _timm_folder_arch(path)
        kind, where = "timm-folder", str(path / TIMM_WEIGHTS)
    elif path is not None and path.is_dir():
        if not is_run(path):
            raise CheckpointError(f"{path} is not a run directory (no {CONFIG} or {CKPT_DIR}/)")
        ckpt, state = latest_checkpoint(path, shallow=True)
        tensors, about = _checkpoint(ckpt, state)
        kind, where = "run", str(ckpt)
    elif path is not None and path.is_file():
        tensors, about, kind = _read_file(path)
        where = str(path)
    elif spec in timm.list_models():
        if arch and arch != spec:
            raise BackboneError(f"two architectures given: {spec!r} and --backbone {arch!r}")
        kind, where, arch = "timm", spec, spec
    else:
        raise BackboneError(f"{spec!r} is not a run directory, a checkpoint or exported file, or a timm model name")

    if arch and about.get("arch") and arch != about["arch"]:
        raise BackboneError(f"{where} holds a {about['arch']} backbone but --backbone {arch} was given; "
                            f"drop --backbone or give the matching architecture")
    arch = arch or about.get("arch")
    if not arch:
        raise BackboneError(f"{where} does not say which architecture it is: pass --backbone NAME (a timm name)")
    if random_init or tensors is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_backbone(arch, zero_init_last=False, stem_stride=about.get("stem_stride", 0),
                                   in_chans=about.get("in_chans", 3))
        random_init = True
    else:
        model = build_backbone(arch, stem_stride=about.get("stem_stride", 0), in_chans=about.get("in_chans", 3))
        _load_into(model, tensors, arch, where)
    model.eval()
    defaults = default_transform(model, arch, recipe)
    for key in ("crop_size", "mean", "std", "transform_from"):
        if recipe or key not in about:
            about[key] = defaults[key]
    info = {
        "kind": kind,
        "source": where,
        "arch": arch,
        "stem_stride": int(about.get("stem_stride", 0)),
        "random_init": random_init,
        "init": f"random (seed {seed}, zero_init_last=False)" if random_init else "loaded",
        "weights_hash": weights_hash(model),
        "feature_dim": feature_dim(model),
        "crop_size": int(about["crop_size"]),
        "mean": [float(v) for v in about["mean"]],
        "std": [float(v) for v in about["std"]],
        "transform_from": about["transform_from"],
    }
    if "step" in about:
        info["step"] = about["step"]
    if "config" in about:
        info["config"] = about["config"]
    if "classifier" in about:
        info["classifier"] = about["classifier"]
    return model, info
