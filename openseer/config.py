"""Typed configuration: dataclasses, YAML in and out, ``key=value`` overrides, validation.

One syntax everywhere: a recipe is a YAML file of partial overrides, the command line adds
``section.key=value`` pairs (values parsed as YAML), and the resolved config is written beside
every run as ``config.yaml``. An unknown key or a value of the wrong type is a ``ConfigError``
that names the key and what is allowed; nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class OpenseerError(Exception):
    """The base of every error a person can fix: ``openseer`` prints its message as one line on
    stderr and exits with status 2. Each subclass also keeps its builtin base (``ValueError``,
    ``RuntimeError``) so code that catches those keeps working."""


class ConfigError(OpenseerError, ValueError):
    """A configuration problem a person can fix: names the key and what is allowed."""


@dataclass
class DataConfig:
    """Where images come from and how they are batched."""

    source: str = "fashion-mnist"  # folder, 'fashion-mnist', or a path to its idx files
    batch_size: int = 256  # GLOBAL batch: split evenly across processes
    num_workers: int = 2  # loader processes for decoded sources (folders)
    limit: int = 0  # use only the first N images of the seeded order (0 = all); for tests
    batched_aug: bool = True  # in-memory sources: augment whole batches of uint8 tensors
    fast_decode: bool = True  # decoded images: reduced-size decode + FastMultiCrop (false: full decode, MultiCrop)
    epoch_samples: int = 0  # tar shards: samples per virtual epoch (0 = from the shards' index.json)
    shuffle_buffer: int = 1000  # tar shards: per-loader-slot shuffle buffer (samples)
    denylist: str = ""  # deny-list file ('' = takedowns.txt beside the shards or in the folder, if any)
    pipe_timeout: float = 300.0  # tar shards: a pipe: command silent this long (s) is stopped, its shard counted bad
    read_timeout: float = 60.0  # files: one taking longer than this (s) to open and read is skipped as 'timeout'
    dicom_window: str = "auto"  # DICOM: auto (the file's WindowCenter/Width) | none (the stored bits' range) | C,W
    dicom_frames: str = "middle"  # multi-frame DICOM: middle (one row per file) | all (a row per frame, key f.dcm#i)
    # pretrain/distill from a folder or list: decode each image once into a small copy kept in the pile index
    # (ROOT/.openseer-index) and train from the copies; auto: on when the pile holds images larger than the side
    decode_cache: bool | str = "auto"  # auto | on | off (a run using it records on and the side in config.yaml)
    decode_cache_side: int = 0  # longer side of the copies; 0 = what the crops need (data/index.py decode_cache_side)


@dataclass
class CropsConfig:
    """SwAV/SEER multi-crop (docs/method.md §3): one entry per resolution group, large first."""

    sizes: list[int] = field(default_factory=lambda: [224, 96])
    counts: list[int] = field(default_factory=lambda: [2, 6])
    min_scale: list[float] = field(default_factory=lambda: [0.14, 0.05])
    max_scale: list[float] = field(default_factory=lambda: [1.0, 0.14])
    flip_p: float = 0.5
    jitter_strength: float = 1.0  # ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


def channel_stats(values: list[float], channels: int) -> list[float]:
    """``crops.mean`` or ``crops.std`` for a backbone of ``channels`` inputs (``model.in_chans``): as
    given when the lengths match, the average of the RGB values for 1 channel, one value repeated for 3."""
    values = [float(v) for v in values]
    if len(values) == channels:
        return values
    if channels == 1:
        return [sum(values) / len(values)]
    return values * channels if len(values) == 1 else values


@dataclass
class ModelConfig:
    """Backbone (any timm model) and the SwAV projection head."""

    arch: str = "regnety_002"
    in_chans: int = 3  # 3 (RGB, grey replicated) or 1 (grey at full depth: DICOM, 16-bit); an RGB --init stem is adapted
    head_hidden: list[int] = field(default_factory=lambda: [2048])  # hidden widths; [] = linear head
    head_out: int = 128
    head_bn: bool = True
    channels_last: bool = True
    zero_init_last: bool = True  # timm's zero-init of each block's last norm
    compile: bool | str = False  # torch.compile the backbone (slow first steps); auto: train/hardware.py
    stem_stride: int = 0  # 0 = the architecture's; 1 = no downsampling in the stem (small images, e.g. 28 px)
    pointwise_matmul: bool = True  # CPU + channels_last: 1x1 convs get a matmul backward (same math, faster)
    narrow_group_fp32: bool = True  # CPU + bf16: grouped convs of < 16 channels per group in fp32 (faster with AMX)
    # pretrain --init: start from these weights (a run, checkpoint, exported/imported file, SEER/VISSL file)
    init: str = ""
    init_parts: list[str] = field(default_factory=lambda: ["backbone", "head", "prototypes"])  # taken when present
    init_kmeans_images: int = 0  # prototypes the source lacks: k-means of this many features (0: max(4096, 4K))
    init_sha256: str = ""  # the init file's SHA-256: filled in by the run; when given, the file must match
    init_loaded: list[str] = field(default_factory=list)  # filled in by the run: the parts loaded from model.init
    init_fresh: list[str] = field(default_factory=list)  # filled in by the run: the parts initialised fresh


@dataclass
class SwAVConfig:
    """Prototypes, Sinkhorn-Knopp and the swapped-prediction loss (docs/method.md §5)."""

    n_prototypes: int = 3000
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iters: int = 3
    crops_for_assign: list[int] = field(default_factory=lambda: [0, 1])
    freeze_prototypes_steps: int = 313
    queue_length: int = 0  # global queue length per target crop; 0 = no queue
    queue_start_step: int = 0  # start filling the queue at this step; used once full


@dataclass
class OptimConfig:
    """SGD + LARC (scaling mode), linear warmup then cosine (docs/method.md §4)."""

    base_lr: float = 0.3  # per 256 images of global batch
    warmup_start_ratio: float = 0.0  # warmup starts at this fraction of the peak LR
    final_lr_ratio: float = 0.001  # cosine ends at this fraction of the peak LR
    epochs: float = 100.0  # schedule length in passes over the data
    minutes: float = 0.0  # wall-clock budget; > 0: the schedule ends at whichever of epochs/minutes comes first
    warmup_steps: int = 0
    momentum: float = 0.9
    weight_decay: float = 1e-6
    lars_trust: float = 0.001
    lars_clip: bool = False
    precision: str = "fp32"  # fp32 | bf16 | fp16 (CUDA only, with a grad scaler) | auto (bf16 where native)
    max_bad_steps: int = 20  # stop after this many consecutive non-finite steps


@dataclass
class CheckpointConfig:
    every: int = 500  # steps between checkpoints (and always at the end)
    keep: int = 3  # keep the last K checkpoints


@dataclass
class LogConfig:
    every: int = 10  # steps between metrics.jsonl lines
    collapse_patience: int = 200  # warn when the loss stays near ln K this many steps after freeze
    tensorboard: bool = True
    progress: bool = True


@dataclass
class MonitorConfig:
    """Optional kNN monitor on labelled data during pretraining."""

    data: str = ""  # e.g. 'fashion-mnist'; empty = off
    every: int = 0  # steps between evaluations; 0 = off
    n_train: int = 5000
    n_test: int = 2000
    k: int = 20


@dataclass
class DistConfig:
    """Multi-process training (docs/distributed.md): DDP or FSDP2, SyncBN groups, activation checkpointing."""

    backend: str = "auto"  # auto | gloo | nccl
    strategy: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard, sharded DCP checkpoints)
    fsdp_wrap: str = "stage"  # fsdp unit: 'stage' (one per backbone stage) or 'block' (one per residual block)
    syncbn_group_size: int = 0  # SyncBN over groups of this many processes; 0 = off (SEER: 64, 8 for 10B)
    activation_checkpointing: bool = False  # recompute each residual block's activations in backward
    activation_checkpointing_stages: list[int] = field(default_factory=list)  # 1-based stages; [] = all


@dataclass
class DistillConfig:
    """``openseer distill``: a student backbone trained to match a teacher's features (openseer/train/distill.py)."""

    teacher: str = ""  # what openseer.load accepts: a run dir, checkpoint, exported/imported file, timm name
    teacher_arch: str = ""  # architecture of a teacher file that does not record it
    loss: str = "cosine"  # cosine (projected student vs teacher features) | swav (teacher prototypes' soft assignments)
    temperature: float = 0.1  # swav loss: the student's softmax temperature over the teacher's prototypes
    teacher_temperature: float = 0.05  # swav loss: the teacher's (sharper) target temperature


@dataclass
class Config:
    """The whole run."""

    recipe: str = "tiny-cpu"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch intra-op threads; 0 = leave as is
    data: DataConfig = field(default_factory=DataConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    swav: SwAVConfig = field(default_factory=SwAVConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def validate(self) -> None:
        """Check values that types alone do not catch; raises ConfigError naming the key."""
        c = self.crops
        n = len(c.sizes)
        for name in ("counts", "min_scale", "max_scale"):
            if len(getattr(c, name)) != n:
                raise ConfigError(f"crops.{name} has {len(getattr(c, name))} entries but crops.sizes has {n}")
        if any(s <= 0 for s in c.sizes) or any(k <= 0 for k in c.counts):
            raise ConfigError("crops.sizes and crops.counts must be positive")
        if list(c.sizes) != sorted(c.sizes, reverse=True):
            raise ConfigError(f"crops.sizes must go from large to small, got {c.sizes}")
        for lo, hi in zip(c.min_scale, c.max_scale):
            if not 0 < lo <= hi <= 1:
                raise ConfigError(f"crop scales must satisfy 0 < min_scale <= max_scale <= 1, got ({lo}, {hi})")
        if len(c.mean) not in (1, 3) or len(c.std) not in (1, 3):
            raise ConfigError("crops.mean and crops.std need 3 values (RGB) or 1 (grey; 3 are averaged for 1 channel)")
        if self.model.in_chans not in (1, 3):
            raise ConfigError(f"model.in_chans must be 1 (grey at full depth) or 3 (RGB); got {self.model.in_chans}")
        if self.data.dicom_frames not in ("middle", "all"):
            raise ConfigError(f"data.dicom_frames must be middle or all; got {self.data.dicom_frames!r}")
        w = str(self.data.dicom_window).strip().lower()
        if w not in ("auto", "none"):
            try:
                centre, width = (float(v) for v in w.split(","))
            except ValueError:
                raise ConfigError(f"data.dicom_window must be auto, none or CENTRE,WIDTH (e.g. 40,400); "
                                  f"got {self.data.dicom_window!r}") from None
            if not width > 0:
                raise ConfigError(f"data.dicom_window: the width must be > 0; got {self.data.dicom_window!r}")
        n_crops = sum(c.counts)
        if n_crops < 2:
            raise ConfigError("SwAV needs at least 2 crops (crops.counts)")
        for i in self.swav.crops_for_assign:
            if not 0 <= i < n_crops:
                raise ConfigError(f"swav.crops_for_assign has {i}, allowed 0..{n_crops - 1}")
        if isinstance(self.data.decode_cache, bool):  # YAML reads on/off as true/false
            self.data.decode_cache = "on" if self.data.decode_cache else "off"
        if self.data.decode_cache not in ("auto", "on", "off"):
            raise ConfigError(f"data.decode_cache must be auto, on or off; got {self.data.decode_cache!r}")
        if self.data.decode_cache_side < 0:
            raise ConfigError(f"data.decode_cache_side must be >= 0 (0 = what the crops need); "
                              f"got {self.data.decode_cache_side}")
        if self.data.batch_size < 1:
            raise ConfigError("data.batch_size must be >= 1")
        if self.data.epoch_samples < 0 or self.data.shuffle_buffer < 0 or self.data.num_workers < 0:
            raise ConfigError("data.epoch_samples, data.shuffle_buffer and data.num_workers must be >= 0")
        if self.data.read_timeout <= 0:
            raise ConfigError(f"data.read_timeout must be > 0 seconds; got {self.data.read_timeout:g}")
        if self.data.pipe_timeout <= 0:
            raise ConfigError(f"data.pipe_timeout must be > 0 seconds; got {self.data.pipe_timeout:g}")
        if self.swav.n_prototypes < 2:
            raise ConfigError("swav.n_prototypes must be >= 2")
        if self.swav.epsilon <= 0 or self.swav.temperature <= 0:
            raise ConfigError("swav.epsilon and swav.temperature must be > 0")
        if self.optim.precision not in ("fp32", "bf16", "fp16", "auto"):
            raise ConfigError(f"optim.precision must be one of fp32, bf16, fp16, auto; got {self.optim.precision!r}")
        if isinstance(self.model.compile, str) and self.model.compile != "auto":
            raise ConfigError(f"model.compile must be true, false or auto; got {self.model.compile!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be one of auto, cpu, cuda; got {self.device!r}")
        if self.dist.backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(f"dist.backend must be one of auto, gloo, nccl; got {self.dist.backend!r}")
        if self.distill.loss not in ("cosine", "swav"):
            raise ConfigError(f"distill.loss must be cosine or swav; got {self.distill.loss!r}")
        if self.distill.temperature <= 0 or self.distill.teacher_temperature <= 0:
            raise ConfigError("distill.temperature and distill.teacher_temperature must be > 0")
        if self.dist.strategy not in ("ddp", "fsdp"):
            raise ConfigError(f"dist.strategy must be one of ddp, fsdp; got {self.dist.strategy!r}")
        if self.checkpoint.every < 1 or self.checkpoint.keep < 1:
            raise ConfigError("checkpoint.every and checkpoint.keep must be >= 1")
        if self.model.stem_stride < 0:
            raise ConfigError(f"model.stem_stride must be >= 0 (0 = the architecture's own), got {self.model.stem_stride}")
        parts = ("backbone", "head", "prototypes")
        bad = [p for p in self.model.init_parts if p not in parts]
        if bad or (self.model.init and "backbone" not in self.model.init_parts):
            raise ConfigError(f"model.init_parts lists the parts of model.init to load, backbone always among them "
                              f"(of {', '.join(parts)}); got {self.model.init_parts}")
        if self.model.init_kmeans_images < 0:
            raise ConfigError("model.init_kmeans_images must be >= 0 (0 = max(4096, 4 x swav.n_prototypes))")
        if self.log.every < 1:
            raise ConfigError("log.every must be >= 1")
        if self.optim.epochs <= 0:
            raise ConfigError("optim.epochs must be > 0")
        if not math.isfinite(self.optim.minutes) or self.optim.minutes < 0:
            raise ConfigError(f"optim.minutes must be >= 0 (0 = no time budget), got {self.optim.minutes}")
        if not math.isfinite(self.optim.base_lr) or self.optim.base_lr <= 0:
            raise ConfigError("optim.base_lr must be a positive number")

    @property
    def n_crops(self) -> int:
        return sum(self.crops.counts)


# ---------------------------------------------------------------- conversion helpers


def to_dict(cfg: Any) -> dict:
    """A plain dict (for YAML and checkpoints) of a config dataclass."""
    return dataclasses.asdict(cfg)


def _allowed(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotated type ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, e.g. {key}=[1,2]; got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} matches none of {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key} must be null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false; got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer; got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number; got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string; got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def merge(cfg: Any, values: dict, prefix: str = "") -> None:
    """Apply a nested dict of values onto a config dataclass, in place, with type checks."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping of keys to values; got {values!r}")
    hints = typing.get_type_hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {full!r}; allowed here: {_allowed(type(cfg))}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            merge(current, value, prefix=f"{full}.")
        else:
            setattr(cfg, key, _coerce(value, hints[key], full))


def parse_override(text: str) -> dict:
    """``a.b=value`` -> ``{'a': {'b': value}}``; the value is parsed as YAML (numbers, lists, bools)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse value: {e}") from None
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


# ---------------------------------------------------------------- recipes and files


def recipe_names() -> list[str]:
    """Names of the built-in recipes (YAML files in openseer/recipes)."""
    folder = resources.files("openseer") / "recipes"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def recipe_values(name: str) -> dict:
    """The raw override dict of a built-in recipe, or of a YAML file path."""
    path = Path(name)
    if name.endswith((".yaml", ".yml")):
        if not path.is_file():
            raise ConfigError(f"recipe file {name!r} does not exist")
        return _read_yaml(path)
    folder = resources.files("openseer") / "recipes"
    f = folder / f"{name}.yaml"
    if not f.is_file():
        raise ConfigError(f"unknown recipe {name!r}; available: {', '.join(recipe_names())}")
    return yaml.safe_load(f.read_text()) or {}


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())  # safe_load: config files are data, never code
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return data or {}


def build_config(recipe: str = "tiny-cpu", overrides: list[str] | None = None, base: dict | None = None) -> Config:
    """Defaults <- recipe <- ``base`` dict <- ``key=value`` overrides, validated."""
    cfg = Config()
    values = recipe_values(recipe)
    values.pop("recipe", None)
    merge(cfg, values)
    cfg.recipe = recipe
    if base:
        merge(cfg, base)
    for text in overrides or []:
        merge(cfg, parse_override(text))
    cfg.validate()
    return cfg


def load_config(path: str | Path) -> Config:
    """Read a resolved ``config.yaml`` (as written by ``save_config``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    cfg = Config()
    merge(cfg, _read_yaml(path))
    cfg.validate()
    return cfg


def config_from_dict(values: dict) -> Config:
    cfg = Config()
    merge(cfg, values)
    cfg.validate()
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
