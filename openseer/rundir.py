"""The run directory: the one owner of its layout, and the small readers and writers of its files.

``openseer pretrain``/``distill`` write, and ``eval``, ``report``, ``doctor``, ``takedown``, ``load``
read, one folder::

    RUN_DIR/
      config.yaml                 the resolved config of the run (CONFIG)
      schedule.json               batch, LR and length as functions of the world size (SCHEDULE)
      metrics.jsonl               one JSON object per logged step (METRICS)
      checkpoints/                step_XXXXXXXX.pt, or step_XXXXXXXX.dcp/ (sharded) (CKPT_DIR)
      data_provenance.json        what was read, the deny-list in force (PROVENANCE)
      data_listing.txt.gz         a folder/list run's keys in its order, gzip'd (data/takedown.py LISTING)
      init.json                   what --init (model.init) loaded: file, SHA-256, parts loaded and fresh (INIT)
      bad_images.txt              "reason<TAB>key" per unreadable image (BAD_IMAGES)
      diagnostics/                step_XXXXXXXX_rankR.json per skipped step (DIAGNOSTICS)
      tb/                         TensorBoard scalars (TENSORBOARD)
      eval.json, report.html      ``openseer eval`` and ``openseer report`` (EVAL, REPORT)

Every module names these files through this one (a bottom-layer module: the standard library, yaml
and ``openseer.config``/``fileio`` only), so a reader never guesses what a writer called a file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import yaml

from .config import (
    Config,
    ConfigError,
    OpenseerError,
    load_config,
    merge,
    parse_override,
    save_config,
    to_dict,
)
from .fileio import atomic_write_text

CONFIG = "config.yaml"
SCHEDULE = "schedule.json"
METRICS = "metrics.jsonl"
CKPT_DIR = "checkpoints"
META = "meta.pt"  # the non-tensor part of a sharded (.dcp) checkpoint
PROVENANCE = "data_provenance.json"
INIT = "init.json"  # the weights a run started from (pretrain --init): file, hash, parts loaded / fresh
BAD_IMAGES = "bad_images.txt"
DIAGNOSTICS = "diagnostics"
TENSORBOARD = "tb"
EVAL = "eval.json"
REPORT = "report.html"
CLASSIFIER = "classifier.safetensors"  # a few-label classifier (openseer finetune): backbone + head + classes
FINETUNE = "finetune.json"  # how it was chosen: protocols, cross-validated estimates, baselines

_CKPT_NAME = re.compile(r"^step_(\d{8,})\.(pt|dcp)$")

# overrides that may change when a run is resumed; everything else must match the checkpoint
RESUMABLE_KEYS = ("checkpoint.", "log.", "data.num_workers", "monitor.", "threads", "device", "dist.backend",
                  "dist.strategy", "dist.fsdp_wrap", "dist.activation_checkpointing",
                  "model.compile", "model.pointwise_matmul",
                  "model.narrow_group_fp32",  # speed, not the math (tests/train/test_levers.py)
                  "model.init")  # the starting weights: a resumed run continues from its checkpoint instead
# overrides that make a resumed run longer: the loop re-plans the schedule from where the run stands
# (train/optim.py ``extend_schedule``) and rewrites config.yaml
EXTENDABLE_KEYS = ("optim.epochs", "optim.minutes")


class RunError(OpenseerError, RuntimeError):
    """A run that cannot start or continue; the message says what and how to fix it."""


def is_run(path: str | Path) -> bool:
    """Whether ``path`` looks like a run directory (a config or a checkpoints folder)."""
    path = Path(path)
    return (path / CONFIG).is_file() or (path / CKPT_DIR).is_dir()


# ---------------------------------------------------------------- checkpoints: names and listing


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """Where the (whole-tensor) checkpoint of ``step`` goes: ``checkpoints/step_XXXXXXXX.pt``."""
    return Path(run_dir) / CKPT_DIR / f"step_{step:08d}.pt"


def checkpoint_step(path: str | Path) -> int:
    """The step of a checkpoint file or ``.dcp`` directory, from its name."""
    m = _CKPT_NAME.match(Path(path).name)
    if not m:
        raise ValueError(f"{path} is not named like a checkpoint (step_XXXXXXXX.pt or .dcp)")
    return int(m.group(1))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary files are never listed)."""
    folder = Path(run_dir) / CKPT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := _CKPT_NAME.match(p.name)) and (p.suffix == ".pt" or (p / META).is_file())]
    return [p for _, p in sorted(found)]


def leftover_temporaries(run_dir: str | Path) -> list[Path]:
    """Half-written checkpoints (``*.tmp``) a crash left behind."""
    folder = Path(run_dir) / CKPT_DIR
    return sorted(folder.glob("*.tmp")) if folder.is_dir() else []


# ---------------------------------------------------------------- config and start/resume


def load_run_config(run_dir: str | Path) -> Config:
    """The saved config of a run (ConfigError/OSError when missing or bad)."""
    return load_config(Path(run_dir) / CONFIG)


def check_writable(run_dir: Path, error: type[Exception] = RunError,
                   what: str = "cannot write to output directory {}") -> None:
    """Refuse an output directory we cannot write, before any work: ``error(what.format(dir) + why)``."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise error(f"{what.format(run_dir)}: {e.strerror or e}") from None


def config_diff(a: Config, b: Config) -> str:
    """The first setting (outside the resumable keys) that differs between two configs, or ''."""
    da, db = to_dict(a), to_dict(b)
    for section, values in da.items():
        items = values.items() if isinstance(values, dict) else [(None, values)]
        for k, v in items:
            key = f"{section}.{k}" if k is not None else section
            other = db[section][k] if k is not None else db[section]
            if v != other and not key.startswith(RESUMABLE_KEYS) and key not in ("recipe", *EXTENDABLE_KEYS):
                return f"{key}: {v!r} vs {other!r}"
    return ""


def resume_config(run_dir: Path, overrides: list[str]) -> Config:
    """The saved config of a run, with only the overrides that may change on resume."""
    cfg = load_run_config(run_dir)
    saved = load_run_config(run_dir)
    for text in overrides:
        key = text.split("=", 1)[0]
        if not key.startswith(RESUMABLE_KEYS) and key not in EXTENDABLE_KEYS:
            raise ConfigError(f"{key!r} cannot change when resuming (it would change the run); "
                              f"allowed on resume: {', '.join(RESUMABLE_KEYS)}; to train longer: "
                              f"{' or '.join(EXTENDABLE_KEYS)} with a larger value")
        merge(cfg, parse_override(text))
    cfg.validate()
    check_extension(saved, cfg)
    return cfg


def check_extension(saved: Config, cfg: Config) -> None:
    """A resume may make a run longer, never shorter: ``optim.epochs`` and ``optim.minutes`` (0 = no
    budget, the longest) may only grow."""
    before, now = saved.optim, cfg.optim
    if now.epochs < before.epochs:
        raise ConfigError(f"optim.epochs={now.epochs:g} is shorter than the run's {before.epochs:g}: a resume can "
                          "extend a run, not shorten it (use --max-steps to stop earlier)")
    if before.minutes and now.minutes and now.minutes < before.minutes:
        raise ConfigError(f"optim.minutes={now.minutes:g} is shorter than the run's {before.minutes:g}: a resume "
                          "can extend a run, not shorten it (use --max-steps to stop earlier)")


def rewrite_config(run_dir: str | Path, cfg: Config) -> None:
    """Replace a run's config.yaml (a resume that extended it), atomically."""
    atomic_write_text(Path(run_dir) / CONFIG, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def prepare_run_dir(run_dir: Path, cfg: Config, resume: bool | str, main: bool, write: bool = True) -> bool:
    """Create or check the run directory; returns whether to resume from a checkpoint.

    ``resume='auto'`` (``--auto-resume``, for torchrun restarts and job requeues) continues a run
    already in ``run_dir`` with the same config, or starts it when there is none yet.
    ``write=False`` only checks (nothing is created), so a bad ``--out`` is refused at once and a
    start that fails later (bad data, unknown backbone) leaves no half-made run behind.
    """
    has_config = (run_dir / CONFIG).is_file()
    if resume == "auto":
        if has_config:
            diff = config_diff(load_run_config(run_dir), cfg)
            if diff:
                raise RunError(f"{run_dir} holds a run with a different config ({diff}); "
                               f"choose another --out or resume it with --resume {run_dir}")
            if list_checkpoints(run_dir):
                if write:
                    check_writable(run_dir)
                return True
        if write:
            check_writable(run_dir)
            if main:
                save_config(cfg, run_dir / CONFIG)
                (run_dir / METRICS).unlink(missing_ok=True)
        return False
    if resume:
        if not has_config:
            raise RunError(f"{run_dir} is not a run directory (no {CONFIG}); start a run with --out {run_dir}")
        if not list_checkpoints(run_dir):
            raise RunError(f"{run_dir} has no checkpoint to resume from (the run stopped before its first one, "
                           f"in {run_dir / CKPT_DIR}); remove {run_dir} and start the run again with --out")
        if write:
            check_writable(run_dir)
        return True
    if run_dir.exists() and (has_config or list_checkpoints(run_dir)):
        raise RunError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out")
    if write:
        check_writable(run_dir)
        if main:
            save_config(cfg, run_dir / CONFIG)
    return False


# ---------------------------------------------------------------- the files a run writes as it goes


def write_schedule(run_dir: Path, schedule: dict) -> None:
    (Path(run_dir) / SCHEDULE).write_text(json.dumps(schedule, indent=1))


def write_init(run_dir: Path, record: dict) -> None:
    """Write what a run's starting weights were (``INIT``: file, SHA-256, parts loaded and fresh)."""
    atomic_write_text(Path(run_dir) / INIT, json.dumps(record, indent=1) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` in order; lines torn by a crash (and anything without a step) are skipped."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics logged after the checkpoint we resume from (they will be logged again)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line torn by a crash
    atomic_write_text(path, "".join(x + "\n" for x in keep))  # a kill while rewriting loses nothing


def append_bad_images(run_dir: Path, bad: list[tuple[str, str]]) -> None:
    """Add (key, reason) pairs to ``bad_images.txt`` as ``reason<TAB>key`` lines."""
    with open(Path(run_dir) / BAD_IMAGES, "a") as f:
        for key, reason in bad:
            f.write(f"{reason}\t{key}\n")


def read_bad_images(run_dir: str | Path) -> list[tuple[str, str]]:
    """(reason, key) per line of ``bad_images.txt`` (none when there is no such file)."""
    path = Path(run_dir) / BAD_IMAGES
    if not path.is_file():
        return []
    return [tuple(line.split("\t", 1)) for line in path.read_text().splitlines() if "\t" in line]  # type: ignore[misc]


def read_json(run_dir: str | Path, name: str) -> dict | None:
    """A JSON file of the run (``EVAL``, ``SCHEDULE``, ...): None when absent; ValueError when it is not JSON."""
    path = Path(run_dir) / name
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def diagnostic_path(run_dir: str | Path, step: int, rank: int) -> Path:
    """Where the diagnostic of a skipped (non-finite) step on ``rank`` goes."""
    return Path(run_dir) / DIAGNOSTICS / f"step_{step:08d}_rank{rank}.json"
