"""Which layer the frozen-feature protocols read (``openseer eval --layer``).

The default is the pooled last stage, what SEER and VISSL report. A user can also read an earlier
stage, or several stages concatenated (VISSL evaluated res4 as well as res5; DINO concatenates
several layers): earlier stages keep finer detail that a short pretraining may not have carried to
the last one. Stages are named as timm names them in ``model.feature_info`` (RegNet: ``stem``,
``s1`` .. ``s4``; ResNet: ``act1``, ``layer1`` .. ``layer4``). Each stage's map is global-average
pooled; with several stages each pooled vector is L2-normalised before they are concatenated, so a
wide stage does not outvote a narrow one in kNN's cosine (the linear probe standardises anyway).
The fine-tunes always train the whole backbone with a head on its last stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import EvalError
from .features import FEATURE_LAYER

LAST = "last"


def stage_channels(model: nn.Module) -> dict[str, int]:
    """{stage module name: channels} in order, from timm's ``feature_info`` (empty if it has none)."""
    info = getattr(model, "feature_info", None) or []
    return {f["module"]: int(f["num_chs"]) for f in info if isinstance(f, dict) and f.get("module")}


def stage_names(model: nn.Module) -> list[str]:
    """The module names of the backbone's stages (empty if it has no timm ``feature_info``)."""
    return list(stage_channels(model))


def parse_layer(spec: str, model: nn.Module, arch: str = "the backbone") -> tuple[str, ...]:
    """Stage names for ``spec`` ('last', 'NAME' or 'NAME+NAME...'); () means the pooled last stage."""
    spec = spec.strip()
    if spec in ("", LAST):
        return ()
    names = tuple(n.strip() for n in spec.split("+"))
    known = stage_names(model)
    bad = [n for n in names if n and n not in known]
    problem = ("an empty stage name" if "" in names else f"unknown stage {', '.join(map(repr, bad))}" if bad
               else "a stage named twice" if len(set(names)) != len(names) else "")
    if problem:
        choices = ", ".join(known) if known else "none: it has no timm feature_info"
        raise EvalError(f"--layer {spec!r}: {problem}; {arch} has stages {choices} (join several with '+'), "
                        f"or 'last'")
    return names


def layer_dim(model: nn.Module, names: tuple[str, ...]) -> int | None:
    """Width of the features ``names`` give (the stages' channels added up); None for the last stage."""
    if not names:
        return None
    chs = stage_channels(model)
    return sum(chs[n] for n in names)


def layer_spec(names: tuple[str, ...]) -> str:
    """``names`` back in ``--layer`` form: 'last', 's3', 's3+s4'."""
    return "+".join(names) or LAST


def layer_label(names: tuple[str, ...]) -> str:
    """The short form each result row carries: 'pooled last', 'pooled s3+s4'."""
    return f"pooled {layer_spec(names)}"


def describe_layer(names: tuple[str, ...]) -> str:
    """The feature layer in words, for the report and the feature cache key."""
    if not names:
        return FEATURE_LAYER
    if len(names) == 1:
        return f"pooled {names[0]} (global average pool of that stage's output)"
    return f"pooled {layer_spec(names)} (global average pool of each stage, each L2-normalised, concatenated)"


class PooledStages(nn.Module):
    """Wraps a timm backbone so that ``forward`` returns the pooled output of the named stages.

    Forward hooks catch the stages' outputs during ``forward_features`` and are removed again after
    each call, so the wrapped model is left as it was (the fine-tunes reuse it).
    """

    def __init__(self, model: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.names = names
        modules = dict(model.named_modules())
        self._stages = tuple(modules[n] for n in names)  # a plain tuple: not registered twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        caught: dict[str, torch.Tensor] = {}
        hooks = [m.register_forward_hook(lambda _m, _a, out, n=n: caught.__setitem__(n, out))
                 for n, m in zip(self.names, self._stages)]
        try:
            self.model.forward_features(x)
        finally:
            for h in hooks:
                h.remove()
        pooled = [caught[n].float().mean((2, 3)) for n in self.names]
        if len(pooled) == 1:
            return pooled[0]
        return torch.cat([F.normalize(p, dim=1) for p in pooled], dim=1)


def feature_model(model: nn.Module, names: tuple[str, ...]) -> nn.Module:
    """``model`` itself for the last stage, else a ``PooledStages`` view of it."""
    return PooledStages(model, names) if names else model
