"""The Python API: ``openseer.load(...)`` -> a ``Model`` that embeds images, exports and evaluates.

    import openseer
    model = openseer.load("runs/a")              # run dir, checkpoint, exported file, or timm name
    emb = model.embed(["img1.jpg", "img2.png"])  # numpy (N, D) float32, one row per image
    clf = openseer.load("clf/")                  # a classifier from `openseer finetune`
    probs = clf.predict(["img1.jpg"])            # (N, C) class probabilities, columns clf.classes
    net = model.backbone                         # the plain timm nn.Module: images -> pooled features
    mid = openseer.load("runs/a", layer="s3+s4") # earlier stages, each pooled and L2-normalised, joined

Images are prepared exactly as ``openseer eval`` prepares them (``EvalTransform``: images no larger
than the training crop are resized to it, larger ones have their shorter side scaled to 1.14 x crop
and are centre-cropped; grayscale is replicated; normalised with the training mean/std).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.decode import BadImage, load_image, to_rgb
from ..eval.common import RESIZE_RATIO, EvalTransform, draft_size  # noqa: F401  (draft_size: re-exported)
from ..eval.layers import LAST, feature_model, layer_dim, layer_spec, parse_layer


def image_tensor(item: Any, crop: int) -> torch.Tensor:
    """One image as a (C, H, W) tensor on the 0..255 scale (uint8, or float for float inputs).

    Accepts a path (str or Path), a PIL image, a numpy array (H, W) / (H, W, C) (uint8 0..255 or
    float 0..1) or a torch tensor (C, H, W) / (H, W) with the same value conventions.
    Undecodable files raise ``BadImage`` with a reason.
    """
    from PIL import Image

    if isinstance(item, (str, Path)):
        img = load_image(item, draft_size=draft_size(crop))
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    if isinstance(item, Image.Image):
        return torch.from_numpy(np.asarray(to_rgb(item), dtype=np.uint8).copy()).permute(2, 0, 1)
    if isinstance(item, np.ndarray):
        arr = item[..., None] if item.ndim == 2 else item
        if arr.ndim != 3:
            raise ValueError(f"an image array must be (H, W) or (H, W, C); got shape {item.shape}")
        t = torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1)
    elif isinstance(item, torch.Tensor):
        t = item.unsqueeze(0) if item.ndim == 2 else item
        if t.ndim != 3:
            raise ValueError(f"an image tensor must be (C, H, W) or (H, W); got shape {tuple(item.shape)}")
    else:
        raise TypeError(f"cannot embed a {type(item).__name__}: give paths, PIL images, numpy arrays or tensors")
    if t.shape[0] == 4:
        t = t[:3]
    if t.shape[0] not in (1, 3):
        raise ValueError(f"an image needs 1, 3 or 4 channels; got {t.shape[0]}")
    if t.is_floating_point():
        t = t.float() * 255.0
    return t


def prepare(items: Sequence[Any], transform: EvalTransform) -> torch.Tensor:
    """Images -> one normalised float batch (B, 3, crop, crop)."""
    return transform.normalize(torch.cat([transform.geometry(image_tensor(x, transform.crop).unsqueeze(0))
                                          for x in items]))


class Model:
    """A backbone with what it needs to be used: its transform, its info, and the actions on it.

    ``layer`` picks the features ``embed`` returns, as ``openseer eval --layer`` does: 'last' (the
    pooled last stage), a stage as timm names it ('s3'), or stages joined by '+' ('s3+s4').
    """

    def __init__(self, backbone: nn.Module, info: dict, spec: str | None = None, device: str = "cpu",
                 layer: str = LAST):
        self.backbone = backbone.eval()
        self.info = info
        self.spec = spec
        self.stages = parse_layer(layer, self.backbone, info.get("arch", "the backbone"))
        self.layer = layer_spec(self.stages)
        self.features = feature_model(self.backbone, self.stages)
        self.transform = EvalTransform(int(info["crop_size"]), tuple(info["mean"]), tuple(info["std"]))
        self.device = torch.device(device)
        self.backbone.to(self.device)

    def __repr__(self) -> str:
        layer = f", layer {self.layer}" if self.stages else ""
        return (f"openseer.Model({self.arch}, {self.info.get('init', 'loaded')}, crop {self.transform.crop}, "
                f"{self.feature_dim}-d features{layer}, from {self.info.get('source')})")

    @property
    def arch(self) -> str:
        return self.info["arch"]

    @property
    def feature_dim(self) -> int:
        """Width of what ``embed`` returns (the chosen stages' channels added up)."""
        return layer_dim(self.backbone, self.stages) or int(self.info["feature_dim"])

    def to(self, device: str | torch.device) -> Model:
        self.device = torch.device(device)
        self.backbone.to(self.device)
        return self

    def embed(self, images: Any, batch_size: int = 64, normalize: bool = False,
              progress: bool = False) -> np.ndarray:
        """Pooled features (N, D) float32, one row per image, in order.

        ``images``: a list of paths / PIL images / arrays / tensors, one of those alone, or a uint8
        batch tensor (B, C, H, W). ``normalize=True`` L2-normalises each row (for cosine search).
        A file that cannot be decoded raises ``BadImage`` naming it (``openseer embed`` skips and
        lists such files instead).
        """
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            items: list = list(images)
        elif isinstance(images, (str, Path)) or not isinstance(images, Iterable) or (
                isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim <= 3):
            items = [images]
        else:
            items = list(images)
        out = np.zeros((len(items), self.feature_dim), dtype=np.float32)
        from ..progress import progress as progress_bar

        bar = progress_bar("embed", total=len(items), unit="img", enabled=progress, leave=False)
        for start in range(0, len(items), batch_size):
            x = prepare(items[start:start + batch_size], self.transform)
            out[start:start + len(x)] = self.forward(x)
            bar.update(len(x))
        bar.close()
        if normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def forward(self, x: torch.Tensor) -> np.ndarray:
        """Normalised batch (B, 3, H, W) -> features (B, D) float32 numpy."""
        with torch.inference_mode():
            f = self.features(x.to(self.device, non_blocking=True))
        return f.float().cpu().numpy()

    @property
    def classes(self) -> list[str] | None:
        """The class names of a classifier (``openseer finetune``'s output), in the order of
        ``predict``'s columns; None for a plain backbone."""
        return self._head()[1] if self.info.get("classifier") else None

    def _head(self):
        if not hasattr(self, "_classifier"):
            from .classifier import read_head

            head, classes, meta = read_head(self.info["classifier"])
            self._classifier = (head.to(self.device), classes, meta)
        return self._classifier

    def predict(self, images: Any, batch_size: int = 64) -> np.ndarray:
        """Class probabilities (N, C) float32 of a classifier, one row per image (columns: ``classes``).
        ``images`` as for ``embed``."""
        if not self.info.get("classifier"):
            raise ValueError(f"{self.spec} is a backbone, not a classifier: train one with `openseer finetune`")
        return self.probabilities(self.embed(images, batch_size=batch_size))

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """A classifier's class probabilities from features ``embed`` returned (N, D)."""
        head = self._head()[0]
        with torch.inference_mode():
            return head(torch.from_numpy(np.array(features, np.float32)).to(self.device)).float().cpu().numpy()

    def embed_collection(self, data: str, out: str | Path, **options) -> dict:
        """``openseer embed``: a folder, file list or shards -> .npy + index.csv (resumable)."""
        from .embed import embed_collection

        return embed_collection(self, data, out, **options)

    def export(self, out: str | Path, format: str | None = None, check: bool = True) -> dict:
        """Write the backbone as safetensors / torchscript / onnx / vissl / timm (see ``openseer.use.export``);
        the whole backbone, whatever ``layer`` this Model embeds with; a classifier whole (head, class names)."""
        from .export import export_model

        return export_model(self.backbone, self.info, out, format, check=check)

    def evaluate(self, data: str = "fashion-mnist", out: str | Path | None = None, **options) -> dict:
        """Run ``openseer eval`` on these weights; ``options`` are ``EvalOptions`` fields
        (``protocols=('knn', 'linear')``, ``limit_train=2000``, ...). Returns the report dict."""
        from ..eval.runner import EvalOptions, evaluate

        kwargs = dict(options)
        kwargs.setdefault("layer", self.layer)
        weights = self.spec
        if weights is None:  # built in Python: evaluate a temporary safetensors copy
            import tempfile

            from .export import save_safetensors

            folder = Path(tempfile.mkdtemp(prefix="openseer-eval-"))
            weights = str(save_safetensors(self.backbone.cpu(), self.info, folder / "backbone.safetensors"))
            self.backbone.to(self.device)
            out = out or folder / "eval.json"
        elif self.info.get("random_init"):
            kwargs.setdefault("random_init", True)
        opts = EvalOptions(weights=str(weights), data=data, out=str(out) if out else None, **kwargs)
        return evaluate(opts)


def load(spec: str | Path, arch: str | None = None, device: str = "cpu", random_init: bool = False,
         seed: int = 0, layer: str = LAST) -> Model:
    """A ``Model`` from a run directory, a checkpoint, an exported file (.safetensors, a .pt state
    dict, an imported SEER file) or a timm model name (random weights: nothing is downloaded).

    ``arch`` names the architecture of files that do not record it; ``layer`` the stages to embed
    with ('last', 's3', 's3+s4': see ``Model``).
    """
    from ..model.load import load_backbone

    backbone, info = load_backbone(str(spec), random_init=random_init, arch=arch, seed=seed)
    if info.get("classifier"):  # its head reads the features it was fitted on
        from .classifier import classifier_meta

        layer = classifier_meta(info["classifier"]).get("layer", LAST)
    return Model(backbone, info, spec=str(spec), device=device, layer=layer)


__all__ = ["BadImage", "Model", "image_tensor", "load", "prepare"]
