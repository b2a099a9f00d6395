"""Start a SwAV model from existing weights: ``openseer pretrain --init WEIGHTS`` (``model.init``).

``WEIGHTS`` is what ``openseer.load`` reads (a run directory: its latest checkpoint; a training
checkpoint, ``.pt`` or sharded ``.dcp``; a file written by ``export``, ``import-seer`` or
``finetune``; a timm or openseer state dict) or a full SEER/VISSL SwAV checkpoint, whose ``heads``
hold the projection MLP and the prototypes (model/vissl_layout.py maps their names).

What loads (``model.init_parts``, default all three, each when the source has it):

- the backbone, always; an RGB stem is adapted to ``model.in_chans`` as timm adapts pretrained
  weights (``adapt_input_conv``: 1 channel sums the RGB filters, N repeat them rescaled);
- the projection head, when its widths match the config;
- the prototypes, with the head they were trained with. When the source has none (or they are not
  taken), they start from the spherical k-means centroids (faiss, seeded) of the L2-normalised
  projected features of a seeded sample of the new pile, rather than at random.

Any part the source has that does not fit the config is refused with one message naming the first
differing key and both shapes (``mismatch``, as ``import-seer`` says it). A partial load is never
silent: ``record`` says which file (and its SHA-256) was read, what was loaded, adapted and
initialised fresh; the run writes it into ``config.yaml`` (``model.init_*``) and ``RUN_DIR/init.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..rundir import CLASSIFIER, is_run
from .backbone import BackboneError, adapt_stem
from .checkpoint_file import latest_checkpoint, load_checkpoint
from .load import CLASSIFIER_FORMAT
from .vissl_layout import (
    SWAV_HEAD_PREFIXES,
    _clean,
    guess_arch,
    mismatch,
    read_weights,
    swav_head_shape,
    vissl_to_timm,
)

INIT_FORMAT = "openseer.init.v1"
TIMM_CLASSIFIER_PREFIXES = ("head.fc.", "fc.", "classifier.")  # as import-seer drops them


class InitError(BackboneError):
    """Starting weights (``--init``) that cannot be read or do not fit the model."""


@dataclass
class InitSource:
    """The tensors of a starting point, by part, and where they came from."""

    spec: str
    file: Path  # the file (or .dcp folder) read
    kind: str  # run | checkpoint | safetensors | vissl | state_dict
    backbone: dict[str, torch.Tensor]  # timm names
    head: dict[str, torch.Tensor] = field(default_factory=dict)  # openseer SwAV names: head.mlp.* and prototypes.*
    origin: dict[str, str] = field(default_factory=dict)  # timm key -> the file's key, where they differ
    about: dict = field(default_factory=dict)  # arch, step, ... as the source says them


def sha256_of(path: str | Path) -> str:
    """SHA-256 (hex) of a file, or of a folder (a sharded ``.dcp`` checkpoint: every file's relative
    name and bytes, in sorted order)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _split(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(backbone, head) of an openseer SwAV state dict (prefixes from DDP/compile removed)."""
    state = {_clean(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return backbone, {k: v for k, v in state.items() if k.startswith(SWAV_HEAD_PREFIXES)}


def read_init(spec: str) -> InitSource:
    """The starting point ``spec`` names, read on CPU (``weights_only`` loads; safetensors)."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise InitError(f"model.init {spec!r} does not exist: give a run directory, a checkpoint, an exported or "
                        f"imported file, or a SEER/VISSL checkpoint")
    about: dict = {}
    if path.is_dir() and path.suffix != ".dcp" and (path / CLASSIFIER).is_file():
        path = path / CLASSIFIER
    elif path.is_dir() and path.suffix != ".dcp":
        if not is_run(path):
            raise InitError(f"model.init {spec}: a folder that is not a run directory (no config.yaml or checkpoints/)")
        path, _ = latest_checkpoint(path, shallow=True)
    if path.is_dir():  # a sharded checkpoint: consolidated in this process
        state = load_checkpoint(path)
        backbone, head = _split(state["model"])
        about["step"] = int(state.get("step", 0))
        return InitSource(spec, path, "checkpoint", backbone, head, about=about)
    try:
        raw, layout, _, meta, head = read_weights(path)
    except BackboneError as e:
        raise InitError(f"model.init: {e}") from None
    origin: dict[str, str] = {}
    if layout == "vissl":
        raw, origin = vissl_to_timm(raw)
        origin = {k: f"_feature_blocks.{v}" for k, v in origin.items()}
        kind = "vissl"
    elif path.suffix == ".safetensors":
        kind = "safetensors"
        if meta.get("format") == CLASSIFIER_FORMAT:  # a classifier: its backbone, without the class head
            drop = set(json.loads(meta.get("head_keys", "[]")))
            raw = {k: v for k, v in raw.items() if k not in drop}
    else:
        kind = "checkpoint" if head or Path(path).parent.name == "checkpoints" else "state_dict"
    if kind in ("safetensors", "state_dict"):  # a timm classifier's own head is not part of the backbone
        raw = {k: v for k, v in raw.items() if not k.startswith(TIMM_CLASSIFIER_PREFIXES)}
    for key in ("arch", "step"):
        if key in meta:
            about[key] = meta[key]
    return InitSource(spec, path, kind, dict(raw), head, origin, about)


def _shapes(module: nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {f"{prefix}{k}": tuple(v.shape) for k, v in module.state_dict().items()}


def _load_part(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, src: InitSource, what: str,
               hint: str) -> None:
    """Load ``state`` (keys with ``prefix``) into ``module``; InitError naming the first difference."""
    problem = mismatch(state, _shapes(module, prefix), src.origin)
    if problem:
        raise InitError(f"model.init {src.file}: its {what} does not fit this model: {problem}. {hint}")
    with torch.no_grad():
        module.load_state_dict({k[len(prefix):]: v for k, v in state.items()}, strict=True)


def load_init(model: nn.Module, src: InitSource, cfg) -> dict:
    """Load what ``src`` has of ``cfg.model.init_parts`` into a SwAV ``model`` (model/swav.py); returns
    the record so far: parts loaded, adapted, and those left fresh (prototypes: ``needs_kmeans``)."""
    m = cfg.model
    parts = set(m.init_parts)
    loaded: dict[str, int] = {}
    fresh: dict[str, str] = {}
    adapted: list[str] = []
    backbone = dict(src.backbone)
    note = adapt_stem(backbone, model.backbone)
    if note:
        adapted.append(note)
    arch_hint = f"Set model.arch (now {m.arch}) to the architecture the weights were trained with"
    if mismatch(backbone, _shapes(model.backbone), src.origin):  # said before the error: which one that is
        held = src.about.get("arch") or guess_arch(src.backbone)
        if held and held != m.arch:
            arch_hint = f"The file holds {held}: set model.arch={held}"
    _load_part(model.backbone, backbone, "", src, f"backbone (for {m.arch})", arch_hint)
    loaded["backbone"] = len(backbone)
    head = {k: v for k, v in src.head.items() if k.startswith("head.")}
    has_protos = "prototypes.layer.weight" in src.head
    widths = swav_head_shape(src.head)
    if head and "head" in parts:
        given = ", ".join(f"model.{k}={v}" for k, v in widths.items() if k.startswith("head_"))
        _load_part(model.head, head, "head.", src, "SwAV projection head",
                   f"Match the file's head ({given}) or start the head fresh: model.init_parts=[backbone]")
        loaded["head"] = len(head)
    else:
        fresh["head"] = ("random: not in model.init_parts" if head else "random: the source has no SwAV head")
    if has_protos and "prototypes" in parts and "head" in loaded:
        protos = {"prototypes.layer.weight": src.head["prototypes.layer.weight"]}
        _load_part(model.prototypes, protos, "prototypes.", src, "prototypes",
                   f"Set swav.n_prototypes={widths.get('n_prototypes')} or start them from k-means of the new pile: "
                   f"model.init_parts=[backbone,head]")
        loaded["prototypes"] = 1  # as saved (SwAV saves unit rows): the first step's codes use exactly these
    else:
        why = ("not in model.init_parts" if has_protos and "prototypes" not in parts else
               "the head they belong to starts fresh" if has_protos else "the source has none")
        fresh["prototypes"] = f"k-means ({why})"
    return {"loaded": loaded, "fresh": fresh, "adapted": adapted}


def kmeans_sample_size(cfg) -> int:
    """How many projected features the k-means of the prototypes clusters."""
    k = cfg.swav.n_prototypes
    n = cfg.model.init_kmeans_images or max(4096, 4 * k)
    if n < k:
        raise InitError(f"model.init_kmeans_images={n} is fewer than swav.n_prototypes={k}: k-means needs at least "
                        f"one feature per prototype")
    return n


@torch.no_grad()
def projected_features(model: nn.Module, batches: Iterable[list[torch.Tensor]], n: int,
                       device: torch.device) -> torch.Tensor:
    """The first ``n`` L2-normalised projections (``model.head`` after the backbone) of the crops in
    ``batches``, computed as training computes them (train mode: batch statistics); the model's
    buffers (BatchNorm running statistics) are left as they were."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    was = model.training
    model.train()
    out, have = [], 0
    try:
        for crops in batches:
            z, _ = model([c.to(device) for c in crops])
            out.append(z.float().cpu())
            have += z.shape[0]
            if have >= n:
                break
    finally:
        for b, v in saved:
            b.copy_(v)
        model.train(was)
    z = torch.cat(out)[:n] if out else torch.zeros(0)
    return F.normalize(z, dim=1)


def kmeans_centroids(features: torch.Tensor, k: int, seed: int, niter: int = 20) -> torch.Tensor:
    """Spherical k-means (faiss, seeded) of L2-normalised ``features``: K unit-norm centroids."""
    import faiss

    x = np.ascontiguousarray(features.detach().cpu().float().numpy())
    if x.shape[0] < k:
        raise InitError(f"k-means of the prototypes needs at least {k} features (swav.n_prototypes); the pile gave "
                        f"{x.shape[0]}")
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=int(seed), spherical=True, verbose=False,
                      max_points_per_centroid=max(256, math.ceil(x.shape[0] / k)),
                      min_points_per_centroid=1)  # a sample of the pile, chosen small on purpose: no warning
    km.train(x)
    return F.normalize(torch.from_numpy(np.array(km.centroids, dtype=np.float32)), dim=1)


def kmeans_prototypes(model: nn.Module, batches: Iterable[list[torch.Tensor]], cfg, device: torch.device) -> dict:
    """Set ``model.prototypes`` to the k-means centroids of the pile's projected features (computed on
    rank 0 and broadcast, so every rank starts alike); returns what was done."""
    n = kmeans_sample_size(cfg)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    weight = model.prototypes.layer.weight
    if world == 1 or dist.get_rank() == 0:
        feats = projected_features(model, batches, n, device)
        centroids = kmeans_centroids(feats, cfg.swav.n_prototypes, cfg.seed).to(weight.device, weight.dtype)
        used = int(feats.shape[0])
    else:
        centroids = torch.empty_like(weight)
        used = n
    if world > 1:
        dist.broadcast(centroids, src=0)
    with torch.no_grad():
        weight.copy_(centroids)
    model.prototypes.normalize_()
    return {"features": used, "seed": int(cfg.seed), "k": int(cfg.swav.n_prototypes)}


def init_record(src: InitSource, sha: str, result: dict) -> dict:
    """What ``RUN_DIR/init.json`` says of a start from ``src``."""
    record = {"format": INIT_FORMAT, "init": src.spec, "file": str(src.file), "sha256": sha, "kind": src.kind}
    if src.about.get("arch"):
        record["source_arch"] = src.about["arch"]
    return {**record, **result}


def describe_init(record: dict) -> str:
    """One phrase for the run's first line: where the weights came from, what loaded, what is fresh."""
    fresh = "; ".join(f"{k} {v}" for k, v in record["fresh"].items())
    adapted = f"; adapted {'; '.join(record['adapted'])}" if record.get("adapted") else ""
    return (f"init {record['file']} (sha256 {record['sha256'][:12]}): loaded {', '.join(record['loaded'])}"
            f"{adapted}{'; fresh: ' + fresh if fresh else ''}; ")


def check_hash(cfg, src: InitSource) -> str:
    """The SHA-256 of the source file; InitError when ``model.init_sha256`` names another."""
    sha = sha256_of(src.file)
    want = cfg.model.init_sha256.strip().lower()
    if want and want != sha:
        raise InitError(f"model.init {src.file} has SHA-256 {sha}, not model.init_sha256={want}: the file changed "
                        f"since the config was written (clear model.init_sha256 to start from it anyway)")
    return sha


__all__ = ["InitError", "InitSource", "check_hash", "describe_init", "init_record", "kmeans_centroids",
           "kmeans_prototypes", "load_init", "projected_features", "read_init", "sha256_of"]
