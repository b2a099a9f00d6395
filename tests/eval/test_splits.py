"""Low-shot split files: stratified, disjoint from test, identical across runs and models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from openseer.eval.common import EvalError, Labelled, open_labelled
from openseer.eval.lowshot import lowshot_splits, save_split

from ..conftest import fmnist_available
from .conftest import write_class_folders


def _toy(n_per_class: int = 50, classes: int = 4) -> Labelled:
    labels = np.repeat(np.arange(classes), n_per_class)
    keys = [f"toy:{i}" for i in range(len(labels))]
    return Labelled.from_tensors(torch.zeros(len(labels), 1, 4, 4, dtype=torch.uint8), labels, keys)


def test_splits_are_stratified_and_deterministic(tmp_path):
    train = _toy()
    a = lowshot_splits(train, ["a", "b", "c", "d"], seed=0, percents=(10,), per_class=(3,))
    b = lowshot_splits(train, ["a", "b", "c", "d"], seed=0, percents=(10,), per_class=(3,))
    for name in ("10pct", "3perclass"):
        assert np.array_equal(a[name]["indices"], b[name]["indices"])
    assert np.bincount(train.labels[a["10pct"]["indices"]]).tolist() == [5, 5, 5, 5]
    assert np.bincount(train.labels[a["3perclass"]["indices"]]).tolist() == [3, 3, 3, 3]
    other = lowshot_splits(train, ["a", "b", "c", "d"], seed=1, percents=(10,))
    assert not np.array_equal(a["10pct"]["indices"], other["10pct"]["indices"])
    # the split depends on keys, not on the order the images come in
    perm = np.random.default_rng(0).permutation(len(train))
    shuffled = train.subset(perm)
    c = lowshot_splits(shuffled, ["a", "b", "c", "d"], seed=0, percents=(10,))
    assert sorted(shuffled.keys[i] for i in c["10pct"]["indices"]) == sorted(
        train.keys[i] for i in a["10pct"]["indices"])
    p1 = save_split(tmp_path / "one", "10pct", a["10pct"], train, "toy", "fp", 0)
    p2 = save_split(tmp_path / "two", "10pct", b["10pct"], train, "toy", "fp", 0)
    assert p1.read_text() == p2.read_text()
    doc = json.loads(p1.read_text())
    assert doc["n"] == 20 and len(doc["keys"]) == 20 and doc["indices"] == sorted(doc["indices"])


@fmnist_available
def test_fashion_mnist_splits_are_disjoint_from_test():
    data = open_labelled("fashion-mnist")
    splits = lowshot_splits(data.train, data.classes, seed=0)
    one = splits["1pct"]["indices"]
    assert len(one) == 600 and np.bincount(data.train.labels[one]).tolist() == [60] * 10
    assert not set(data.train.keys[i] for i in one) & set(data.test.keys)
    assert set(one) <= set(splits["10pct"]["indices"])  # same order per class: the 1% is inside the 10%


def test_folder_split_is_stratified_and_disjoint(tmp_path):
    write_class_folders(tmp_path / "lab", {"cat": 10, "dog": 10, "owl": 10})
    a = open_labelled(str(tmp_path / "lab"), seed=0, test_fraction=0.2)
    b = open_labelled(str(tmp_path / "lab"), seed=0, test_fraction=0.2)
    assert a.train.keys == b.train.keys and a.test.keys == b.test.keys
    assert np.bincount(a.test.labels).tolist() == [2, 2, 2]
    assert not set(a.train.keys) & set(a.test.keys)


def test_a_class_too_small_for_a_split_is_an_error():
    train = _toy(n_per_class=6)
    train = train.subset(np.flatnonzero((train.labels != 1) | (np.arange(len(train)) % 6 < 4)))
    with pytest.raises(EvalError, match="the 5-per-class split needs 5 images per class, but class 'b' has only 4"):
        lowshot_splits(train, ["a", "b", "c", "d"], seed=0, percents=(), per_class=(5,))


def test_train_val_folders_and_csv_split_column(tmp_path):
    write_class_folders(tmp_path / "tv" / "train", {"cat": 4, "dog": 4})
    write_class_folders(tmp_path / "tv" / "val", {"cat": 2, "dog": 2}, seed=1)
    d = open_labelled(str(tmp_path / "tv"))
    assert (len(d.train), len(d.test), d.classes) == (8, 4, ["cat", "dog"])
    assert d.split == "folders train/ and val/"
    rows = ["path,label,split"] + [f"tv/train/{c}/{i:03d}.png,{c},train" for c in ("cat", "dog") for i in range(4)]
    rows += [f"tv/val/{c}/{i:03d}.png,{c},val" for c in ("cat", "dog") for i in range(2)]
    (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
    c = open_labelled(str(tmp_path / "l.csv"))
    assert (len(c.train), len(c.test), c.split) == (8, 4, "CSV split column")
