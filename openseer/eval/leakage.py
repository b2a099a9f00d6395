"""Test-set leakage audit: which evaluation images have a copy in the run's pretraining pile.

A number measured on images the model was pretrained on (or on their re-encoded, resized, mirrored
copies) is not a measure of what it learned. ``openseer eval RUN --leakage`` finds the run's pile
(``data.source`` of its config, or ``--pile``), queries every train and test image of the labelled
data against it and writes the copies found to a CSV beside eval.json; ``--leakage exclude`` also
leaves the leaked test images out, so the numbers are measured on images the model did not see.

How a pile is searched: a folder, a file list or local shards through its persistent near-copy index
(data/index.py; built here once when missing or stale, as ``openseer index PILE`` would), the same
search ``takedown check --near`` makes (re-encodings, resizes, crops and mirror images, each candidate
verified on its pixels); ``pipe:`` shards, which cannot be indexed, by a scan of the pile; an in-memory
pile (Fashion-MNIST) has no file to index, so it is compared by exact pixels only (an identical image,
not a near copy: the report says so).
"""

from __future__ import annotations

import csv
import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.collection import Collection, TensorCollection, open_collection
from ..data.decode import BadImage, DataError
from ..data.index import IndexMismatch, ensure_index, index_folder, open_index
from .common import EvalError, Labelled, LabelledData

MODES = ("report", "exclude")
COLUMNS = ["split", "eval_image", "label", "pile_key", "pile_path", "similarity", "verified", "excluded"]


@dataclass
class Leakage:
    """What the audit found: one row per (evaluation image, copy in the pile)."""

    pile: str
    method: str
    mode: str
    rows: list[dict] = field(default_factory=list)
    leaked: dict[str, list[int]] = field(default_factory=lambda: {"train": [], "test": []})
    searched: dict[str, int] = field(default_factory=dict)
    unreadable: dict[str, int] = field(default_factory=dict)
    csv: str = ""

    def describe(self) -> dict:
        """eval.json's ``leakage``: the pile, how it was searched, counts per split, what was excluded."""
        return {"pile": self.pile, "method": self.method, "mode": self.mode, "csv": self.csv,
                "searched": self.searched, "unreadable": self.unreadable,
                "train_in_pile": len(self.leaked["train"]), "test_in_pile": len(self.leaked["test"]),
                "test_excluded": len(self.leaked["test"]) if self.mode == "exclude" else 0}

    def note(self) -> str:
        """One line for eval.md."""
        n, m = len(self.leaked["test"]), len(self.leaked["train"])
        done = (f"left out of the test split ({self.searched.get('test', 0) - n} test images remain)"
                if self.mode == "exclude" and n else
                "not excluded (`--leakage exclude` leaves them out)" if n else "")
        return (f"leakage audit ({self.method}) against the pretraining pile {self.pile}: {n} of "
                f"{self.searched.get('test', 0)} test images and {m} of {self.searched.get('train', 0)} train "
                f"images have a copy in it" + (f"; the test ones are {done}" if done else "")
                + (f"; listed in {self.csv}" if self.csv else ""))


def run_pile(info: dict, pile: str = "") -> str:
    """The pretraining pile of the evaluated weights: ``pile`` when given, else ``data.source`` of the
    run's config (a relative folder is read from where it is found: here, or beside the run)."""
    if pile:
        return pile
    cfg = info.get("config")
    source = cfg.get("data", {}).get("source") if isinstance(cfg, dict) else None
    if not source:
        raise EvalError(f"{info.get('source', 'these weights')}: no training config to find the pretraining pile "
                        f"in; give it with --pile PILE")
    return str(source)


def _label(split: Labelled, i: int) -> str:
    return str(split.paths[i]) if split.paths else split.keys[i]


def _pixel_key(arr: np.ndarray) -> str:
    arr = np.ascontiguousarray(arr)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = np.ascontiguousarray(np.moveaxis(arr, 0, -1))  # (C, H, W) -> (H, W, C)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    h = hashlib.sha256(str(arr.shape).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def _exact(coll: TensorCollection, data: LabelledData, result: Leakage) -> None:
    """Exact pixel matches against an in-memory pile."""
    pile = coll.images.numpy()
    grey = pile.shape[1] == 1
    where = {}
    for r in range(len(pile)):
        where.setdefault(_pixel_key(pile[r]), r)
    for split_name in ("train", "test"):
        split: Labelled = getattr(data, split_name)
        for i in range(len(split)):
            if split.images is not None:
                arr = split.images[i].numpy()
            else:
                try:
                    img = split.collection.load(i)
                except BadImage:
                    result.unreadable[split_name] = result.unreadable.get(split_name, 0) + 1
                    continue
                arr = np.asarray(img.convert("L" if grey else "RGB"))
            r = where.get(_pixel_key(arr))
            if r is not None:
                _found(result, split_name, split, i, coll.key(r), "", 1.0, 1.0)


def _found(result: Leakage, split_name: str, split: Labelled, i: int, key: str, path: str, sim: float,
           verified: float) -> None:
    if not result.leaked[split_name] or result.leaked[split_name][-1] != i:
        result.leaked[split_name].append(i)
    result.rows.append({"split": split_name, "eval_image": _label(split, i), "label": int(split.labels[i]),
                        "pile_key": key, "pile_path": path, "similarity": round(float(sim), 4),
                        "verified": round(float(verified), 4),
                        "excluded": split_name == "test" and result.mode == "exclude"})


def _near(coll: Collection, pile: str, data: LabelledData, result: Leakage, say, progress: bool) -> None:
    """Near copies through the pile's index (built when missing), or a scan where it cannot be indexed."""
    from ..data.nearcopy import PileIndex
    from ..progress import progress as bar

    try:
        index_folder(coll)
        indexable = True
    except IndexMismatch:
        indexable = False
    if indexable:
        try:
            index = open_index(coll)
        except IndexMismatch as e:
            say(f"leakage: {e}: describing the pile again")
            index = None
        if index is None:
            print(f"openseer: leakage: indexing the pretraining pile {pile} once, as `openseer index {pile}` "
                  f"would (later audits and takedowns read the index)", file=sys.stderr)
            index = ensure_index(pile, progress=progress, log=lambda t: say(t.removeprefix("openseer: ")))
        say(f"leakage: searching the index of {pile} ({len(index)} images)")
        result.method = "near copies, from the pile's index"
    else:
        say(f"leakage: {pile} cannot be indexed: scanning it")
        index = PileIndex(pile, progress=progress)
        result.method = "near copies, by a scan of the pile"
    with bar("leakage audit", total=len(data.train) + len(data.test), unit="img", enabled=progress) as p:
        for split_name in ("train", "test"):
            _query(index, data, split_name, result, p)


def _query(index, data: LabelledData, split_name: str, result: Leakage, p) -> None:
    """Every image of one split against the pile (about 0.1 s an image on 2 cores: describing it at
    many windows, the search, verifying its candidates)."""
    split: Labelled = getattr(data, split_name)
    for i in range(len(split)):
        p.update(1)
        try:
            img = split.collection.load(i)
        except BadImage:
            result.unreadable[split_name] = result.unreadable.get(split_name, 0) + 1
            continue
        if not hasattr(img, "convert"):  # an in-memory labelled set: uint8 (C, H, W)
            from PIL import Image

            a = img.numpy()
            img = Image.fromarray(a[0] if a.shape[0] == 1 else np.moveaxis(a, 0, -1))
        for key, path, sim, verified in sorted(index.copies_of(img), key=lambda c: -c[3]):
            _found(result, split_name, split, i, key, path, sim, verified)


def audit(data: LabelledData, pile: str, mode: str, csv_path: Path, say=lambda t: None,
          progress: bool = False) -> Leakage:
    """Search the pile for every train and test image of ``data``; write the CSV; with ``exclude``,
    leave the leaked test images out of ``data.test`` (noted in ``data.notes``)."""
    if mode not in MODES:
        raise EvalError(f"--leakage must be one of {', '.join(MODES)}, got {mode!r}")
    spec = pile
    if not os.path.exists(os.path.expanduser(pile)) and pile != "fashion-mnist" and "::" not in pile \
            and not pile.startswith("pipe:") and not any(c in pile for c in "{*?"):
        raise EvalError(f"the pretraining pile {pile} does not exist here (it is the run's data.source): "
                        f"give it with --pile PILE")
    try:
        coll = open_collection(spec)
    except DataError as e:
        raise EvalError(f"cannot open the pretraining pile for the leakage audit: {e}") from None
    result = Leakage(pile=pile, method="", mode=mode,
                     searched={"train": len(data.train), "test": len(data.test)})
    if isinstance(coll, TensorCollection):
        result.method = "exact pixels (an in-memory pile has no near-copy index; near copies are not searched)"
        say(f"leakage: {pile} is held in memory: comparing exact pixels only")
        _exact(coll, data, result)
    else:
        _near(coll, pile, data, result, say, progress)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(result.rows)
    result.csv = str(csv_path)
    n = len(result.leaked["test"])
    if mode == "exclude" and n:
        if n == len(data.test):
            raise EvalError(f"every one of the {n} test images has a copy in the pretraining pile {pile}: "
                            f"nothing is left to evaluate on (see {csv_path})")
        keep = np.setdiff1d(np.arange(len(data.test)), result.leaked["test"])
        data.test = data.test.subset(keep)
        data.notes.append(f"left out {n} test images with a copy in the pretraining pile (leakage audit)")
    print(f"openseer: leakage: {n} test and {len(result.leaked['train'])} train images have a copy in {pile} "
          f"-> {csv_path}", file=sys.stderr)
    return result
