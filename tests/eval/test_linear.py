"""The linear probe: separable data, selection on validation (never test), low-shot rows."""

from __future__ import annotations

import numpy as np

from openseer.eval.linear import linear_probe


def _separable(n: int, seed: int, dim: int = 32, classes: int = 5):
    """Gaussian blobs around fixed, well separated centres (the same centres for every ``seed``)."""
    centres = np.random.default_rng(0).normal(0, 1, (classes, dim)) * 4
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    return (centres[y] + rng.normal(0, 1, (n, dim))).astype(np.float32), y


def test_probe_on_linearly_separable_features():
    x, y = _separable(3000, seed=1)
    xt, yt = _separable(1000, seed=2)
    r = linear_probe(x, y, xt, yt, n_classes=5, seed=0)
    assert r["top1"] >= 95.0
    assert r["top5"] == 100.0
    assert len(r["grid"]) >= 4 and all("val_top1" in g for g in r["grid"])
    assert (r["lr"], r["weight_decay"]) in [(g["lr"], g["weight_decay"]) for g in r["grid"]]
    assert "of train" in r["val_split"]


def test_probe_on_a_subset_of_rows_and_a_single_image_class():
    x, y = _separable(400, seed=3)
    rows = np.array([i for c in range(5) for i in np.flatnonzero(y == c)[: (1 if c == 0 else 4)]])
    r = linear_probe(x, y[rows], x, y, n_classes=5, train_rows=rows)
    assert r["val_top1"] is None  # a class with one image: no validation split, fixed settings
    assert r["top1"] >= 80.0


def test_baseline_probes_side_by_side_equal_one_after_another():
    from types import SimpleNamespace

    from openseer.eval.runner import _linear_probes

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    yt = rng.integers(0, 3, 90)
    feats = {m: (rng.normal(size=(300, d)).astype(np.float32) + y[:, None], rng.normal(size=(90, d)).astype(np.float32)
                 + yt[:, None]) for m, d in (("random_init", 12), ("pixels", 20))}
    data = SimpleNamespace(train=SimpleNamespace(labels=y), test=SimpleNamespace(labels=yt), n_classes=3)
    splits = {"10pct": {"indices": np.arange(0, 300, 10)}}
    plan = [("full", {"knn", "linear"}), ("10pct", {"linear"})]
    got = _linear_probes([(m, a, b, plan) for m, (a, b) in feats.items()], data, splits, seed=0)
    for m, (a, b) in feats.items():
        assert got[m]["full"] == linear_probe(a, y, b, yt, 3, 0)
        rows = splits["10pct"]["indices"]
        assert got[m]["10pct"] == linear_probe(a, y[rows], b, yt, 3, 0, train_rows=rows)
