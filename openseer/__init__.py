"""openseer: SEER-style self-supervised pretraining (SwAV + RegNetY) on uncurated images.

Use the features from Python (imports are lazy: ``import openseer`` loads no torch)::

    import openseer
    model = openseer.load("runs/a")             # run dir, checkpoint, exported file, or timm name
    emb = model.embed(["img1.jpg", "img2.png"]) # numpy (N, D), one row per image
    net = model.backbone                        # the plain timm nn.Module, pooled features out
    model.export("backbone.onnx")               # safetensors / torchscript / onnx / vissl
    model.evaluate("fashion-mnist", protocols=("knn",))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from .use.api import Model


def load(spec: Any, arch: str | None = None, device: str = "cpu", random_init: bool = False,
         seed: int = 0, layer: str = "last") -> Model:
    """A ``Model`` (``.embed``, ``.backbone``, ``.export``, ``.evaluate``) from a run directory, a
    checkpoint, an exported or imported file, or a timm name (random weights, nothing is downloaded).
    ``layer``: the features ``embed`` returns ('last', a stage such as 's3', or 's3+s4')."""
    from .use.api import load as _load

    return _load(spec, arch=arch, device=device, random_init=random_init, seed=seed, layer=layer)


def __getattr__(name: str) -> Any:
    if name == "Model":
        from .use.api import Model

        return Model
    raise AttributeError(f"module 'openseer' has no attribute {name!r}")


__all__ = ["Model", "__version__", "load"]
