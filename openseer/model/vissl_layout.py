"""VISSL's checkpoint layout (SEER's released files) <-> timm's RegNet key names, and the SwAV head.

In the model layer so that both ``openseer import-seer`` (use/vissl.py) and ``pretrain --init``
(model/init.py) read SEER's files with one mapping.

SEER's released files are VISSL checkpoints (``seer_regnet32gf_model_iteration244000.torch``, ...)::

    {"classy_state_dict": {"base_model": {"model": {"trunk": {...}, "heads": {...}}}}, ...}

The trunk is ClassyVision's AnyNet/RegNet wrapped by VISSL's ``regnet`` trunk, which renames the
stem to ``conv1`` and stage ``blockS`` to ``res{S+1}`` inside ``_feature_blocks``:

=============================================================== ===================================
VISSL trunk key                                                 timm key
=============================================================== ===================================
``_feature_blocks.conv1.stem.0.weight`` (3x3 s2 conv)           ``stem.conv.weight``
``_feature_blocks.conv1.stem.1.*`` (BN)                         ``stem.bn.*``
``_feature_blocks.res{S+1}.block{S}-{i}.proj.weight``           ``s{S}.b{i+1}.downsample.conv.weight``
``....bn.*``                                                    ``s{S}.b{i+1}.downsample.bn.*``
``....f.a.0.weight`` / ``f.a.1.*`` (1x1 conv, BN)               ``....conv1.conv.weight`` / ``conv1.bn.*``
``....f.b.0.weight`` / ``f.b.1.*`` (3x3 group conv, BN)         ``....conv2.conv.weight`` / ``conv2.bn.*``
``....f.se.excitation.0.*`` / ``f.se.excitation.2.*``           ``....se.fc1.*`` / ``se.fc2.*``
``....f.c.weight`` / ``f.final_bn.*`` (1x1 conv, BN)            ``....conv3.conv.weight`` / ``conv3.bn.*``
=============================================================== ===================================

VISSL's FSDP trunk (``regnet_v2``/``regnet_fsdp``, the 10B model) adds a block-group level
(``res2.block1-part0.block1-0...``) and FSDP wrapper names (``_fsdp_wrapped_module.``,
``_fpw_module.``); both are accepted.

The SwAV head (``heads``: VISSL's ``SwAVPrototypesHead``) maps onto openseer's SwAV module
(model/swav.py), whose MLP has the same layer order (Linear, [BatchNorm1d], ReLU, ..., Linear):

=============================================================== ===================================
VISSL head key                                                  openseer SwAV key
=============================================================== ===================================
``heads.0.projection_head.{N}.*``                               ``head.mlp.{N}.*``
``heads.0.prototypes0.weight`` (K x D, no bias)                 ``prototypes.layer.weight``
=============================================================== ===================================

``read_weights(path)`` reads a VISSL, timm or openseer file (``torch.load`` with
``weights_only=True`` or safetensors) and returns the trunk tensors, the SwAV head (openseer names,
when the file has one) and what it leaves out; ``mismatch`` names the first key whose name or
shape differs from a model's. ``to_vissl`` is the inverse, for ``openseer export --format vissl``.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from .backbone import BackboneError, build_backbone

_BLOCK_PARTS = [  # VISSL (ClassyVision) block-relative name -> timm block-relative name
    ("proj.", "downsample.conv."),
    ("bn.", "downsample.bn."),
    ("f.a.0.", "conv1.conv."),
    ("f.a.1.", "conv1.bn."),
    ("f.b.0.", "conv2.conv."),
    ("f.b.1.", "conv2.bn."),
    ("f.se.excitation.0.", "se.fc1."),
    ("f.se.excitation.2.", "se.fc2."),
    ("f.c.", "conv3.conv."),
    ("f.final_bn.", "conv3.bn."),
]
_STEM_PARTS = [("conv1.stem.0.", "stem.conv."), ("conv1.stem.1.", "stem.bn.")]
_VISSL_BLOCK = re.compile(r"^res(\d+)\.(?:block\d+-part\d+\.)?block(\d+)-(\d+)\.(.+)$")
_TIMM_BLOCK = re.compile(r"^s(\d+)\.b(\d+)\.(.+)$")
_WRAPPERS = ("_fsdp_wrapped_module.", "_fpw_module.", "_checkpoint_wrapped_module.")
_PREFIXES = ("module.", "_orig_mod.", "trunk.", "base_model.", "model.")
_VISSL_HEAD = re.compile(r"^(?:heads\.)?0\.(projection_head\.\d+\..+|prototypes(\d+)\.weight)$")
SWAV_HEAD_PREFIXES = ("head.", "prototypes.")  # openseer SwAV state-dict keys that are not the backbone


class WeightsImportError(BackboneError):
    """A weights file that cannot be imported: wrong layout, or not the architecture asked for."""


# ---------------------------------------------------------------- reading


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str, list[str], dict, dict[str, torch.Tensor]]:
    """(tensors, layout, dropped keys, file metadata, SwAV head) of a VISSL, timm or openseer weights file.

    ``layout`` is ``vissl`` (keys ``_feature_blocks.*``) or ``timm``. Tensors come back with the
    layout's own names (VISSL trunk keys without the ``_feature_blocks.`` prefix), CPU, as stored.
    The SwAV head (VISSL's ``heads``, or an openseer SwAV state's ``head.*``/``prototypes.*``) comes
    back with openseer's names (``head.mlp.N.*``, ``prototypes.layer.weight``); it is also listed
    in ``dropped`` (under the file's names) for callers that keep only the backbone.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsImportError(f"{path} does not exist")
    meta: dict = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            state: dict = load_file(str(path))
        except Exception as e:  # safetensors raises several types for a bad file
            raise WeightsImportError(f"{path} is not a readable .safetensors file: {e}") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise WeightsImportError(f"refused to load {path}: it holds objects that would run code when unpickled "
                               f"(only tensors and plain data are allowed). Detail: {str(e).splitlines()[0]}") from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise WeightsImportError(f"{path} is unreadable or truncated: {e}") from None
    if not isinstance(state, dict):
        raise WeightsImportError(f"{path} does not hold a dict of tensors")
    dropped: list[str] = []
    head: dict[str, torch.Tensor] = {}
    if isinstance(state.get("openseer"), dict):  # written by `openseer export --format vissl`
        meta = {str(k): str(v) for k, v in state["openseer"].items()}
    if "classy_state_dict" in state:  # VISSL / ClassyVision
        try:
            model = state["classy_state_dict"]["base_model"]["model"]
        except (KeyError, TypeError):
            raise WeightsImportError(f"{path} has a 'classy_state_dict' without base_model.model: not a VISSL "
                               f"model checkpoint") from None
        trunk, heads = model.get("trunk"), model.get("heads") or {}
        if not isinstance(trunk, dict) or not trunk:
            raise WeightsImportError(f"{path}: classy_state_dict.base_model.model has no 'trunk' tensors")
        dropped = [f"heads.{k}" for k in heads]
        head = vissl_head_to_openseer(heads, path)
        state = trunk
    elif isinstance(state.get("model"), dict) and any(isinstance(v, torch.Tensor) for v in state["model"].values()):
        state = state["model"]  # an openseer training checkpoint or a {'model': state_dict} wrapper
    elif isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsImportError(f"{path} holds no tensors")
    if any(k.endswith("flat_param") or "flat_param_" in k for k in tensors):
        raise WeightsImportError(f"{path} is a sharded FSDP checkpoint (flat_param tensors): consolidate it first "
                           f"(VISSL's extra_scripts/convert_sharded_checkpoint.py), then import the result")
    tensors = {_clean(k): v for k, v in tensors.items()}
    if any(k.startswith("backbone.") for k in tensors):  # openseer SwAV state: the trunk, and the head apart
        dropped += [k for k in tensors if not k.startswith("backbone.")]
        head = {k: v for k, v in tensors.items() if k.startswith(SWAV_HEAD_PREFIXES)}
        tensors = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
    if any(k.startswith("_feature_blocks.") for k in tensors):
        dropped += [k for k in tensors if not k.startswith("_feature_blocks.")]
        tensors = {k[len("_feature_blocks."):]: v for k, v in tensors.items() if k.startswith("_feature_blocks.")}
        return tensors, "vissl", dropped, meta, head
    return tensors, "timm", dropped, meta, head


def _clean(key: str) -> str:
    for w in _WRAPPERS:
        key = key.replace(w, "")
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p) and not key.startswith("_feature_blocks"):
                key, changed = key[len(p):], True
    return key


# ---------------------------------------------------------------- key mapping


def vissl_key_to_timm(key: str) -> str:
    """One VISSL trunk key (without ``_feature_blocks.``) -> timm's name; WeightsImportError if unknown."""
    for src, dst in _STEM_PARTS:
        if key.startswith(src):
            return dst + key[len(src):]
    m = _VISSL_BLOCK.match(key)
    if m:
        res, stage, index, rest = int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4) + "."
        if res != stage + 1:
            raise WeightsImportError(f"VISSL key _feature_blocks.{key}: res{res} should hold block{res - 1}")
        for src, dst in _BLOCK_PARTS:
            if rest.startswith(src):
                return f"s{stage}.b{index + 1}.{dst}{rest[len(src):]}".rstrip(".")
    raise WeightsImportError(f"unknown VISSL RegNet trunk key _feature_blocks.{key} (expected conv1.stem.* or "
                       f"resN.blockS-I.(proj|bn|f.a|f.b|f.se|f.c|f.final_bn).*)")


def timm_key_to_vissl(key: str) -> str:
    """One timm RegNet key -> VISSL's trunk key (with ``_feature_blocks.``)."""
    for dst, src in _STEM_PARTS:
        if key.startswith(src):
            return "_feature_blocks." + dst + key[len(src):]
    m = _TIMM_BLOCK.match(key)
    if m:
        stage, block, rest = int(m.group(1)), int(m.group(2)), m.group(3) + "."
        for dst, src in _BLOCK_PARTS:
            if rest.startswith(src):
                return f"_feature_blocks.res{stage + 1}.block{stage}-{block - 1}.{dst}{rest[len(src):]}".rstrip(".")
    raise WeightsImportError(f"timm key {key} has no VISSL RegNet equivalent: only RegNetX/RegNetY bottleneck "
                       f"trunks (stem, s1..s4 of b1..bN with conv1/conv2/conv3/se/downsample) map to VISSL")


def vissl_to_timm(trunk: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(timm state dict, timm key -> original VISSL key) for VISSL trunk tensors."""
    out, origin = {}, {}
    for k, v in trunk.items():
        if k in ("avgpool", "flatten") or k.startswith(("avgpool.", "flatten.")):
            continue
        t = vissl_key_to_timm(k)
        if t in out:
            raise WeightsImportError(f"two VISSL keys map to {t}: _feature_blocks.{origin[t]} and _feature_blocks.{k}")
        out[t], origin[t] = v, k
    return out, origin


def vissl_head_to_openseer(heads: dict, path: str | Path = "the file") -> dict[str, torch.Tensor]:
    """VISSL's SwAV head tensors (``heads`` of a classy state dict) with openseer's SwAV names; keys of
    other heads (a linear evaluation head) are left out. Several prototype sets (SwAV's multi-K
    variant) are refused: openseer trains one."""
    out: dict[str, torch.Tensor] = {}
    sets = set()
    for k, v in heads.items():
        m = _VISSL_HEAD.match(_clean(str(k)))
        if not m or not isinstance(v, torch.Tensor):
            continue
        if m.group(2) is not None:
            sets.add(int(m.group(2)))
            out["prototypes.layer.weight"] = v
        else:
            out["head.mlp." + m.group(1)[len("projection_head."):]] = v
    if len(sets) > 1:
        raise WeightsImportError(f"{path} has {len(sets)} prototype sets (prototypes0..{max(sets)}); openseer's "
                                 f"SwAV trains one: use the backbone alone (drop prototypes from model.init_parts)")
    return out


def is_swav_head_key(key: str) -> bool:
    """Whether a file's key (VISSL ``heads.0...`` or openseer ``head.*``/``prototypes.*``) is SwAV's head."""
    key = _clean(key)
    return key.startswith(SWAV_HEAD_PREFIXES) or bool(_VISSL_HEAD.match(key))


def swav_head_shape(head: dict[str, torch.Tensor]) -> dict:
    """What a SwAV head's tensors say of it: hidden widths, output width, BN, number of prototypes."""
    linears = sorted((int(k.split(".")[2]), v) for k, v in head.items()
                     if k.startswith("head.mlp.") and k.endswith(".weight") and v.dim() == 2)
    out: dict = {}
    if linears:
        out["head_hidden"] = [int(w.shape[0]) for _, w in linears[:-1]]
        out["head_out"] = int(linears[-1][1].shape[0])
        out["head_bn"] = any(k.endswith(".running_mean") for k in head)
    if "prototypes.layer.weight" in head:
        out["n_prototypes"] = int(head["prototypes.layer.weight"].shape[0])
    return out


def to_vissl(state: dict[str, torch.Tensor], arch: str = "") -> dict:
    """A timm RegNet backbone state dict in VISSL's checkpoint layout (what SEER released)."""
    trunk = {timm_key_to_vissl(k): v.detach().cpu().contiguous() for k, v in state.items()
             if not k.startswith("head.")}
    return {"classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": {}}}},
            "type": "openseer-export", "arch": arch}


# ---------------------------------------------------------------- checking


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def mismatch(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
             origin: dict[str, str] | None = None) -> str:
    """'' when ``state`` has exactly the keys and shapes of ``expected``, else what differs (first first)."""
    origin = origin or {}

    def name(k: str) -> str:
        return f"{k} (file key {origin[k]})" if k in origin and origin[k] != k else k

    order = list(expected)
    for k in order:
        if k not in state:
            missing = [x for x in order if x not in state]
            return f"first missing key {k} {expected[k]} ({len(missing)} missing in all)"
        if tuple(state[k].shape) != expected[k]:
            n = sum(1 for x in order if x in state and tuple(state[x].shape) != expected[x])
            return (f"first mismatched key {name(k)}: file {tuple(state[k].shape)}, expected {expected[k]} "
                    f"({n} tensors of the wrong shape in all)")
    extra = [k for k in state if k not in expected]
    if extra:
        return f"first unexpected key {name(extra[0])} {tuple(state[extra[0]].shape)} ({len(extra)} unexpected in all)"
    return ""


def candidate_archs() -> list[str]:
    import timm

    return [n for n in timm.list_models("regnet*")] + ["seer_regnet_10b"]


def guess_arch(state: dict[str, torch.Tensor]) -> str | None:
    """The timm RegNet whose keys and shapes match ``state`` exactly (built on the meta device)."""
    n_keys = len(state)
    for arch in candidate_archs():
        try:
            model = build_backbone(arch, device="meta")
        except Exception:
            continue
        shapes = _shapes(model)
        if len(shapes) == n_keys and not mismatch(state, shapes):
            return arch
    return None


