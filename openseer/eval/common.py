"""Labelled data for evaluation and the one eval transform every protocol shares.

A labelled split (``Labelled``) is a collection (data/collection.py: files read in bounded time with
the deny-list beside them, or in-memory tensors) plus a label per row. Three kinds of labelled data:
``fashion-mnist`` (its own train/test split), a folder with one subfolder per class (either
``train/`` and ``val/`` (or ``test/``) inside it, or a seeded stratified split), and a CSV of
``path,label`` (optionally a third column ``split`` = train/val/test). Every image has a stable key
(``fashion-mnist:train:17``, a relative path), so subsets chosen by key are the same whatever model
is evaluated.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import OpenseerError
from ..data.collection import (
    FASHION_MNIST_CLASSES,
    Collection,
    Entry,
    FileCollection,
    TensorCollection,
    image_to_tensor,
    is_fashion_mnist,
    list_folder,
    load_fashion_mnist,
    open_denylist,
)
from ..data.decode import IMAGE_EXTENSIONS, BadImage, DataError, Decoding, default_read_timeout
from ..fileio import text_to_name

RESIZE_RATIO = 1.14  # larger images: shorter side to 1.14 x crop, then a centre crop


def draft_size(crop: int) -> int:
    """The smallest decoded side the eval transform needs (JPEGs are DCT-scaled down to it)."""
    return int(crop * RESIZE_RATIO) + 1


class EvalError(OpenseerError, ValueError):
    """An evaluation input a person can fix: the message says what is wrong and how to fix it."""


def warn(text: str) -> None:
    print(f"openseer: {text}", file=sys.stderr)


# ---------------------------------------------------------------- labelled images


@dataclass
class Labelled:
    """One split: a collection (files or a uint8 tensor in memory) and a label per row."""

    collection: Collection
    labels: np.ndarray  # int64 (N,)

    def __post_init__(self) -> None:
        self.keys = [self.collection.key(i) for i in range(len(self.collection))]

    @classmethod
    def from_tensors(cls, images: torch.Tensor, labels: np.ndarray, keys: list[str], name: str = "tensors") -> Labelled:
        """In-memory uint8 images (N, C, H, W) with their labels and keys."""
        return cls(TensorCollection(images, name, keys=list(keys)), np.asarray(labels))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        return self.collection.in_memory

    @property
    def images(self) -> torch.Tensor | None:
        """The uint8 (N, C, H, W) tensor of an in-memory split; None for files."""
        return self.collection.images if isinstance(self.collection, TensorCollection) else None

    @property
    def paths(self) -> list[Path] | None:
        """The files of a split read from disk; None in memory."""
        return self.collection.paths if isinstance(self.collection, FileCollection) else None

    def load(self, i: int, draft_size: int | None = None) -> torch.Tensor:
        """Image ``i`` as uint8 (C, H, W); files raise ``BadImage`` when they cannot be read or decoded
        (bounded reads, the deny-list beside the data: data/collection.py)."""
        img = self.collection.load(i, draft_size=draft_size)
        if isinstance(img, torch.Tensor):
            return img
        x = image_to_tensor(img)  # RGB: uint8 (3, H, W); full-depth grey (model.in_chans 1): float (1, H, W) in [0, 1]
        return x.mul_(255) if x.is_floating_point() else x  # geometry's 0..255 scale, at full depth

    def subset(self, idx: np.ndarray | list[int]) -> Labelled:
        idx = np.asarray(idx, dtype=np.int64)
        return Labelled(self.collection.subset(idx.tolist()), self.labels[idx])

    def fingerprint(self) -> str:
        """A hash of the content (pixels for in-memory data; path, size and mtime for files) and labels."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.labels).tobytes())
        if self.images is not None:
            h.update(str(tuple(self.images.shape)).encode())
            h.update(self.images.contiguous().numpy().tobytes())
        else:
            deny = self.collection.deny
            if deny.keys:
                h.update(f"denylist={deny.version}\n".encode())
            for key, p in zip(self.keys, self.paths or []):
                try:
                    st = p.stat()
                    h.update(f"{key}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
                except OSError:
                    h.update(f"{key}\tmissing\n".encode())
        return h.hexdigest()[:16]


@dataclass
class LabelledData:
    """A labelled data set: train and test splits, class names, and how the split was made."""

    name: str
    train: Labelled
    test: Labelled
    classes: list[str]
    split: str  # how train/test were defined, for the report
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # images left out, by reason (denied, corrupt...)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "split": self.split,
            "n_train": len(self.train),
            "n_test": len(self.test),
            "n_classes": self.n_classes,
            "classes": self.classes,
            "train_fingerprint": self.train.fingerprint(),
            "test_fingerprint": self.test.fingerprint(),
            "skipped": dict(sorted(self.skipped.items())),
            "notes": self.notes,
        }


def key_order(keys: list[str], seed: int) -> np.ndarray:
    """A seeded order of items that depends only on their keys (same subset for any model or machine)."""
    digests = [hashlib.sha1(f"{seed}:{k}".encode()).digest()[:8] for k in keys]
    return np.argsort(np.array([int.from_bytes(d, "big") for d in digests], dtype=np.uint64), kind="stable")


def stratified_take(labels: np.ndarray, keys: list[str], seed: int, fraction: float | None = None,
                    per_class: int | None = None, min_per_class: int = 1,
                    classes: list[str] | None = None, what: str = "this split") -> np.ndarray:
    """Sorted indices of a seeded stratified subset: ``fraction`` of each class (at least
    ``min_per_class``), or ``per_class`` images of each class. A class too small is an EvalError."""
    order = key_order(keys, seed)
    chosen, short = [], []
    for c in np.unique(labels):
        members = order[labels[order] == c]
        n = per_class if per_class is not None else max(min_per_class, int(round(fraction * len(members))))
        if len(members) < n:
            short.append(f"{classes[c] if classes else c!r} has only {len(members)}")
        chosen.append(members[:n])
    if short:
        need = n if per_class is not None else min_per_class
        raise EvalError(f"{what} needs {need} images per class, but class {'; class '.join(short[:10])}"
                        f"{f' (and {len(short) - 10} more)' if len(short) > 10 else ''}. "
                        f"Add images, drop the class, or choose a smaller split")
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def _limit(split: Labelled, n: int, seed: int) -> Labelled:
    if not n or n >= len(split):
        return split
    frac = n / len(split)
    idx = stratified_take(split.labels, split.keys, seed + 7, fraction=frac, min_per_class=1)
    return split.subset(idx[:n] if len(idx) > n else idx)


def open_labelled(spec: str, seed: int = 0, test_fraction: float = 0.2, skip_missing: bool = False,
                  limit_train: int = 0, limit_test: int = 0) -> LabelledData:
    """Open ``--data``: 'fashion-mnist', a folder of class folders, or a CSV of path,label.

    ``test_fraction=0``: no test split is carved out (every labelled image is for training); an
    explicit split (fashion-mnist's, train/ + val/ folders, a CSV split column) is still kept."""
    if not spec:
        raise EvalError("no labelled data given: pass --data fashion-mnist, a folder of class folders, or a CSV")
    path = Path(spec).expanduser()
    if is_fashion_mnist(spec):
        data = _fashion_mnist(None if spec == "fashion-mnist" else path)
    elif not path.exists():
        raise EvalError(f"labelled data {spec!r} does not exist (give 'fashion-mnist', a folder with one "
                        f"subfolder per class, or a CSV of path,label)")
    elif path.is_dir():
        data = _class_folders(path, seed, test_fraction)
    elif path.suffix.lower() in (".csv", ".tsv", ".txt"):
        data = _csv(path, seed, test_fraction, skip_missing)
    else:
        raise EvalError(f"labelled data {spec!r} is neither a folder nor a .csv file")
    if limit_train or limit_test:
        data.train = _limit(data.train, limit_train, seed)
        data.test = _limit(data.test, limit_test, seed)
        data.notes.append(f"restricted to a seeded stratified subset: {len(data.train)} train, {len(data.test)} test")
    for split_name, split in (("train", data.train), ("test", data.test)):
        if len(split) == 0 and not (split_name == "test" and test_fraction <= 0):
            raise EvalError(f"{data.name}: the {split_name} split is empty")
    if data.n_classes < 2:
        raise EvalError(f"{data.name}: found {data.n_classes} class; evaluation needs at least 2")
    return data


def _fashion_mnist(root: Path | None) -> LabelledData:
    try:
        xtr, ytr = load_fashion_mnist("train", root)
        xte, yte = load_fashion_mnist("test", root)
    except DataError as e:
        raise EvalError(str(e)) from None
    train = Labelled(TensorCollection(xtr, "fashion-mnist", ytr, split="train"), ytr.numpy())
    test = Labelled(TensorCollection(xte, "fashion-mnist", yte, split="test"), yte.numpy())
    return LabelledData("fashion-mnist", train, test, list(FASHION_MNIST_CLASSES), "official train/test")


def _class_dirs(root: Path) -> dict[str, list[Path]]:
    out = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = [d / n for n in list_folder(d)]
        if files:
            out[d.name] = files
        else:
            warn(f"class folder {d} holds no images; ignored")
    return out


def _file_collection(root: Path, entries: list[Entry]) -> FileCollection:
    """Files keyed by their names relative to ``root``, with the deny-list beside them."""
    return FileCollection(str(root), "labelled files", root, entries, open_denylist("", root), default_read_timeout())


def _files_split(root: Path, files: dict[str, list[Path]], classes: list[str]) -> Labelled:
    paths, labels = [], []
    for name, fs in files.items():
        paths += fs
        labels += [classes.index(name)] * len(fs)
    entries = [Entry(os.fspath(p.relative_to(root)), p) for p in paths]
    return Labelled(_file_collection(root, entries), np.array(labels, dtype=np.int64))


def _class_folders(root: Path, seed: int, test_fraction: float) -> LabelledData:
    test_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        tr, te = _class_dirs(root / "train"), _class_dirs(test_dir)
        if not tr:
            raise EvalError(f"{root / 'train'} has no class subfolders with images")
        extra = sorted(set(te) - set(tr))
        if extra:
            raise EvalError(f"{test_dir} has classes that {root / 'train'} lacks: {', '.join(extra[:10])}")
        classes = sorted(tr)
        return LabelledData(str(root), _files_split(root, tr, classes), _files_split(root, te, classes), classes,
                            f"folders train/ and {test_dir.name}/")
    per_class = _class_dirs(root)
    if not per_class:
        loose = [p for p in root.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS)]
        what = f"{len(loose)} images directly in it" if loose else "no images"
        raise EvalError(f"{root} is not labelled: it has {what} but no class subfolders. Expected "
                        f"{root}/<class>/<image> (or {root}/train/<class>/... and {root}/val/<class>/...), "
                        f"or a CSV of path,label")
    loose = [p for p in root.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS)]
    if loose:
        warn(f"{len(loose)} images directly in {root} are not in a class folder; ignored")
    classes = sorted(per_class)
    full = _files_split(root, per_class, classes)
    train_idx, test_idx = _stratified_split(full, classes, seed, test_fraction)
    return LabelledData(str(root), full.subset(train_idx), full.subset(test_idx), classes,
                        f"seeded stratified split ({test_fraction:g} test, seed {seed})")


def _stratified_split(full: Labelled, classes: list[str], seed: int,
                      test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    if test_fraction <= 0:  # every labelled image trains (openseer finetune: estimates come from cross-validation)
        return np.arange(len(full)), np.zeros(0, dtype=np.int64)
    counts = np.bincount(full.labels, minlength=len(classes))
    small = [f"{classes[c]!r} ({counts[c]})" for c in range(len(classes)) if counts[c] < 2]
    if small:
        raise EvalError(f"a train/test split needs at least 2 images per class; too few in: {', '.join(small[:10])}")
    test_idx = stratified_take(full.labels, full.keys, seed + 1, fraction=test_fraction, classes=classes,
                               what="the test split")
    train_idx = np.setdiff1d(np.arange(len(full)), test_idx)
    return train_idx, test_idx


def _csv(path: Path, seed: int, test_fraction: float, skip_missing: bool) -> LabelledData:
    dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            rows = [r for r in csv.reader(f, dialect=dialect) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise EvalError(f"cannot read CSV {path}: {e}") from None
    if rows and rows[0][0].strip().lower() in ("path", "file", "filename", "image"):
        rows = rows[1:]
    if not rows:
        raise EvalError(f"CSV {path} has no rows (expected path,label per line)")
    bad = [i + 1 for i, r in enumerate(rows) if len(r) < 2 or not r[0].strip() or not r[1].strip()]
    if bad:
        raise EvalError(f"CSV {path}: rows {bad[:10]} do not have the form path,label")
    base = path.parent
    entries = []
    for r in rows:
        p = Path(r[0].strip()).expanduser()
        if "\\" in r[0] and not (p if p.is_absolute() else base / p).exists():
            p = Path(text_to_name(r[0].strip()))  # a path written as name text (fileio.name_to_text)
        split = r[2].strip().lower() if len(r) > 2 and r[2].strip() else ""
        if split not in ("", "train", "val", "test"):
            raise EvalError(f"CSV {path}: split column must be train, val or test; got {split!r}")
        entries.append((r[0].strip(), p if p.is_absolute() else base / p, r[1].strip(), split))
    missing = [e for e in entries if not e[1].is_file()]
    notes = []
    if missing:
        listed = "\n  ".join(str(e[1]) for e in missing[:20])
        more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        if not skip_missing:
            raise EvalError(f"{len(missing)} of {len(entries)} files listed in {path} do not exist:\n  {listed}{more}\n"
                            f"Fix the paths (relative paths are relative to the CSV's folder) or pass "
                            f"--skip-missing to skip them")
        warn(f"skipping {len(missing)} of {len(entries)} files listed in {path} that do not exist:\n  {listed}{more}")
        notes.append(f"skipped {len(missing)} missing files listed in {path.name}")
        gone = {id(e) for e in missing}
        entries = [e for e in entries if id(e) not in gone]
    classes = sorted({e[2] for e in entries})
    labels = np.array([classes.index(e[2]) for e in entries], dtype=np.int64)
    full = Labelled(_file_collection(path.parent, [Entry(e[0], e[1]) for e in entries]), labels)
    splits = {e[3] for e in entries}
    if splits - {""}:
        if "" in splits or "train" not in splits or not (splits & {"val", "test"}):
            raise EvalError(f"CSV {path}: when a split column is given, every row needs one, with both "
                            f"train and val (or test) rows")
        train_idx = np.array([i for i, e in enumerate(entries) if e[3] == "train"])
        test_idx = np.array([i for i, e in enumerate(entries) if e[3] != "train"])
        how = "CSV split column"
    else:
        train_idx, test_idx = _stratified_split(full, classes, seed, test_fraction)
        how = f"seeded stratified split ({test_fraction:g} test, seed {seed})"
    return LabelledData(str(path), full.subset(train_idx), full.subset(test_idx), classes, how, notes)


# ---------------------------------------------------------------- the eval transform


@dataclass(frozen=True)
class EvalTransform:
    """Images no larger than the crop: resized to crop x crop. Larger: shorter side to 1.14 x crop,
    then a centre crop. Grayscale replicated to 3 channels; normalised with the training mean/std.
    A mean of one value is a one-channel backbone (``model.in_chans=1``): RGB is turned to grey, and
    grey at full depth comes as float on the same 0..255 scale (never rounded to 8 bits)."""

    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def ident(self) -> str:
        m = ",".join(f"{v:g}" for v in self.mean)
        s = ",".join(f"{v:g}" for v in self.std)
        return f"eval-v1:crop={self.crop}:ratio={RESIZE_RATIO}:bilinear-aa:mean={m}:std={s}"

    def describe(self) -> dict:
        return {"crop": self.crop, "resize_ratio": RESIZE_RATIO, "mean": list(self.mean), "std": list(self.std),
                "rule": "images <= crop: resize to crop x crop; larger: shorter side to 1.14 x crop, centre crop"}

    def geometry(self, x: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """uint8 (B, C, H, W) (or float on the 0..255 scale), all the same size -> float (B, 3, S, S)
        in [0, 1] ((B, 1, S, S) for a one-value mean); S = crop unless ``size``."""
        s = size or self.crop
        x = x.float().div_(255)
        if len(self.mean) == 1 and x.shape[1] == 3:
            x = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
        elif len(self.mean) != 1 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        if max(h, w) <= s:
            if (h, w) != (s, s):
                x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)
            return x
        short = int(math.floor(s * RESIZE_RATIO + 0.5))
        nh, nw = (short, max(short, round(w * short / h))) if h <= w else (max(short, round(h * short / w)), short)
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (nh - s) // 2, (nw - s) // 2
        return x[..., top:top + s, left:left + s].clamp(0, 1)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=x.device).view(1, len(self.mean), 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, len(self.std), 1, 1)
        return (x - mean) / std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.geometry(x))


def read_for(data: LabelledData, transform: EvalTransform) -> LabelledData:
    """The splits' files read as ``transform``'s backbone takes them: a one-channel backbone (a
    one-value mean) gets full-depth grey (data/decode.py), never 8 bits; RGB otherwise (unchanged)."""
    if len(transform.mean) == 1:
        for split in (data.train, data.test):
            coll = split.collection
            if not coll.in_memory:
                coll.decoding = Decoding(1, coll.decoding.dicom_window)
    return data


def load_batch(data: Labelled, idx: np.ndarray | list[int], transform: EvalTransform, size: int | None = None,
               bad: list[tuple[int, str]] | None = None) -> torch.Tensor:
    """Images ``idx`` through ``transform.geometry`` (float [0, 1], not normalised), stacked.

    Undecodable files become black images and are appended to ``bad`` (index, reason); with
    ``bad=None`` they raise EvalError.
    """
    if data.images is not None:
        return transform.geometry(data.images[torch.as_tensor(np.asarray(idx, dtype=np.int64))], size)
    s = size or transform.crop

    def one(i: int) -> tuple[torch.Tensor | None, str]:
        try:
            img = data.load(int(i), draft_size=int(s * RESIZE_RATIO) + 1)
        except BadImage as e:
            return None, str(e)
        return transform.geometry(img.unsqueeze(0), size), ""

    out = []
    for i, (x, reason) in zip(idx, _decode_pool().map(one, idx)):  # PIL decodes outside the GIL
        if x is None:
            if bad is None:
                raise EvalError(f"cannot decode {data.paths[int(i)]}: {reason}")
            bad.append((int(i), reason))
            x = torch.zeros(1, 1 if len(transform.mean) == 1 else 3, s, s)
        out.append(x)
    return torch.cat(out)


_POOL: ThreadPoolExecutor | None = None


def _decode_pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="openseer-decode")
    return _POOL
