"""``openseer distill``: a small student backbone trained on unlabelled images to reproduce a teacher's
features, by the one training loop (train/loop.py) running the distill method (train/methods/distill.py,
whose docstring says what the student learns and how). Under torchrun the student trains with DDP.
"""

from __future__ import annotations

from pathlib import Path

from ..config import Config, build_config, config_from_dict, merge, parse_override, to_dict
from ..rundir import CONFIG, load_run_config
from .loop import train
from .methods.distill import (  # noqa: F401  (the method's public names, as callers import them from here)
    DistillMethod,
    DistillTraining,
    Student,
    Teacher,
    distill_loss,
    feature_agreement,
    report_model,
)


def distill_config(teacher: str, student: str, data: str | None, recipe: str | None = None,
                   overrides: list[str] | None = None) -> Config:
    """The config of a new distill run: ``recipe`` (default: the teacher run's own config, else
    tiny-cpu) with the student as ``model.arch``, the teacher, ``--data`` and then ``overrides``."""
    base: dict = {"model": {"arch": student}, "distill": {"teacher": teacher}}
    if data:
        base["data"] = {"source": data}
    tpath = Path(teacher).expanduser()
    if recipe is None and tpath.is_dir() and (tpath / CONFIG).is_file():
        cfg = load_run_config(tpath)
        keep = to_dict(cfg)
        keep.pop("distill", None)
        cfg = config_from_dict(keep)
        cfg.recipe = f"distill from {teacher}"
        merge(cfg, base)
        for text in overrides or []:
            merge(cfg, parse_override(text))
        cfg.validate()
        return cfg
    return build_config(recipe or "tiny-cpu", overrides, base=base)


def distill(cfg: Config, run_dir: str | Path, resume: bool | str = False, max_steps: int | None = None) -> dict:
    """Run (or continue) distillation of ``cfg.model.arch`` from ``cfg.distill.teacher``; a summary dict
    (as ``pretrain``'s)."""
    return train(cfg, run_dir, DistillTraining, resume=resume, max_steps=max_steps)


__all__ = ["DistillMethod", "Student", "Teacher", "distill", "distill_config", "distill_loss", "feature_agreement",
           "report_model"]
