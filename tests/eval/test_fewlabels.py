"""Few-label classifiers: the Wilson interval, folds that never hold out a class's only image, and
cross-validation choosing the better protocol on constructed cases (linear, kNN, label spreading)."""

from __future__ import annotations

import numpy as np
import pytest

from openseer.eval.fewlabels import choose_protocol, fit_protocol, folds, wilson


def test_wilson_interval_known_values():
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(49.02, abs=0.01) and hi == pytest.approx(94.33, abs=0.01)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 100.0
    assert wilson(0, 0) == (0.0, 100.0)


def test_folds_stratify_and_never_hold_out_a_class_s_only_image():
    y = np.repeat(np.arange(3), 10)
    held, scheme = folds(y)
    assert scheme == "stratified 5-fold" and sorted(np.concatenate(held).tolist()) == list(range(30))
    assert all(np.bincount(y[h], minlength=3).tolist() == [2, 2, 2] for h in held)
    held, scheme = folds(np.repeat(np.arange(3), [2, 3, 4]))  # the smallest class decides k
    assert scheme == "stratified 2-fold" and len(held) == 2
    y = np.array([0, 0, 0, 1, 2, 2])  # class 1 has one image
    held, scheme = folds(y)
    assert scheme == "leave-one-out" and 3 not in np.concatenate(held)
    assert folds(np.array([0, 1, 2]))[0] == []


def _linear_case(n: int = 40, d: int = 16, seed: int = 0):
    """Two classes told apart by one low-variance direction under large noise elsewhere: kNN's cosine is
    dominated by the noise, a linear model finds the direction."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(size=(n, d)) * 3
    x[:, 0] = (2 * y - 1) * 0.5 + rng.normal(scale=0.05, size=n)
    x[:, 1] = 10  # off the origin, so unit-normalising keeps the classes apart
    return x.astype(np.float32), y


def _xor_case(n: int = 60, seed: int = 0):
    """Four tight blobs, opposite corners in one class: no line separates them, kNN does."""
    rng = np.random.default_rng(seed)
    corners = np.array([[1, 1], [-1, -1], [1, -1], [-1, 1]], dtype=np.float64)
    which = np.arange(n) % 4
    y = (which >= 2).astype(np.int64)
    pts = corners[which] + rng.normal(scale=0.1, size=(n, 2))
    return np.c_[pts, np.full(n, 3.0)].astype(np.float32), y


def test_cross_validation_picks_the_better_protocol():
    x, y = _linear_case()
    choice = choose_protocol(x, y, 2)
    by_name = {e.protocol: e for e in choice.estimates}
    assert choice.protocol.startswith("linear") and by_name[choice.protocol].accuracy > by_name["knn"].accuracy + 20
    assert choice.best.low <= choice.best.accuracy <= choice.best.high and choice.best.n == len(y)
    assert "spread" in choice.skipped and "finetune" in choice.skipped
    x, y = _xor_case()
    choice = choose_protocol(x, y, 2)
    by_name = {e.protocol: e for e in choice.estimates}
    assert choice.protocol == "knn" and by_name["knn"].accuracy >= 95 and max(
        e.accuracy for e in choice.estimates if e.protocol.startswith("linear")) < 75
    # the chosen protocol, fitted on all labels, predicts new points of the same kind
    test_x, test_y = _xor_case(seed=1)
    head = fit_protocol(choice.protocol, x, y, 2)
    assert (head.proba(test_x).argmax(1) == test_y).mean() >= 0.95


def _moons(n: int = 300, seed: int = 0):
    """Two interleaved half-moons (2-D, lifted to 3-D before unit-normalising)."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, np.pi, n)
    a = np.c_[np.cos(t), np.sin(t)]
    b = np.c_[1 - np.cos(t), 0.5 - np.sin(t)]
    pts = np.r_[a, b] + rng.normal(scale=0.03, size=(2 * n, 2))
    return np.c_[pts, np.full(2 * n, 4.0)].astype(np.float32), np.r_[np.zeros(n), np.ones(n)].astype(np.int64)


def test_label_spreading_follows_the_pile_where_the_labels_alone_mislead():
    pile, truth = _moons()
    n = len(pile) // 2
    labelled = np.array([0, 3, n, n + 3])  # the tip of each moon that points at the other moon
    choice = choose_protocol(pile[labelled], truth[labelled], 2, pile=pile, pile_rows=labelled)
    assert choice.best is not None and choice.best.scheme == "stratified 2-fold"
    test, test_y = _moons(seed=1)
    acc = {}
    for name in ("knn", "linear(l2=0.01)", "spread"):
        head = fit_protocol(name, pile[labelled], truth[labelled], 2, pile=pile, pile_rows=labelled)
        acc[name] = float((head.proba(test).argmax(1) == test_y).mean())
    assert acc["spread"] >= 0.95 and acc["spread"] > acc["knn"] + 0.1 and acc["spread"] > acc["linear(l2=0.01)"] + 0.1
    assert choice.protocol == "spread"


def test_one_label_per_class_gives_no_estimate_and_says_so():
    pile, truth = _moons(100)
    labelled = np.array([0, 100])
    choice = choose_protocol(pile[labelled], truth[labelled], 2, pile=pile, pile_rows=labelled)
    assert choice.best is None and choice.estimates == [] and choice.protocol == "spread"
    assert "no estimate" in choice.note
    assert choose_protocol(pile[labelled], truth[labelled], 2).protocol.startswith("linear")


def test_the_choice_keeps_its_folds_and_held_out_predictions_and_the_best_linear_head():
    from openseer.eval.fewlabels import best_linear

    x, y = _xor_case()
    choice = choose_protocol(x, y, 2)
    assert choice.protocol == "knn" and len(choice.held) == 5
    assert sorted(np.concatenate(choice.held).tolist()) == list(range(len(y)))
    for e in choice.estimates:  # each estimate is its held-out predictions' accuracy
        assert 100 * float((choice.predictions[e.protocol] == y).mean()) == pytest.approx(e.accuracy)
    linear = max((e for e in choice.estimates if e.protocol.startswith("linear")),
                 key=lambda e: (round(e.balanced, 6), round(e.accuracy, 6)))
    assert best_linear(choice).startswith("linear") and best_linear(choice) != choice.protocol
    assert {e.protocol: e.balanced for e in choice.estimates}[best_linear(choice)] == pytest.approx(linear.balanced)
    x, y = _linear_case()
    choice = choose_protocol(x, y, 2)
    assert best_linear(choice) == choice.protocol
    one = choose_protocol(x[:2], y[:2], 2)  # one image per class: no estimates, the default head
    assert one.held == [] and best_linear(one) == "linear(l2=0.01)"
