"""A labelling budget on the evaluation's cached features: N labels chosen by ``select``'s rule against
N random labels, each fitted with the protocol ``finetune`` would pick, scored on the test split.

This is the few-label regime a user with a budget is in (docs/guide.md, "Few labels"). Every row is
computed from the train/test features eval already has, so it costs seconds:

- ``selectN``: ``select``'s rule (eval/typical.py ``choose``: the most typical image of each of N
  k-means clusters) on the model's features of the train split, labels unused; the labels of those
  N images are then read. One draw (the choice is seeded but hardly random), one k-means start.
- ``randomN``: N train images drawn at random (not stratified: a person labelling a random sample),
  ``draws`` times; mean and spread over the draws.

On each set of labels ``fewlabels.choose_protocol`` cross-validates kNN and linear heads on the labels
alone (label spreading over the pile is left to ``openseer finetune`` and bench/labels.py: its graph
costs more than the demo can spend), fits the choice on all N and scores it on the test split.
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import torch

from .fewlabels import choose_protocol, fit_protocol
from .knn import topk_accuracy
from .linear import torch_threads
from .report import Report
from .typical import choose

DRAWS = 5
SELECT_REDO = 1  # k-means starts for the choice: one (5 s of CPU on 60,000 x 520 features; select's 5 take 30)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _score(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, rows: np.ndarray,
           n_classes: int, seed: int) -> tuple[float, float, str, dict | None]:
    """Test top-1 and top-5 % of the protocol chosen by cross-validation on the labels of ``rows``, its
    name and its cross-validated estimate."""
    x, y = np.asarray(xtr[np.sort(rows)], dtype=np.float32), ytr[np.sort(rows)]
    if len(np.unique(y)) < 2:  # one class drawn: the only possible classifier guesses it
        acc = 100.0 * float(np.mean(yte == y[0]))
        return acc, acc, "one class", None
    c = choose_protocol(x, y, n_classes, seed=seed)
    head = fit_protocol(c.protocol, x, y, n_classes)
    scores = np.concatenate([head.proba(np.asarray(xte[a:a + 4096], dtype=np.float32))
                             for a in range(0, len(xte), 4096)])
    top1, top5 = topk_accuracy(torch.from_numpy(scores), yte)
    est = None if c.best is None else {"accuracy": round(c.best.accuracy, 2), "ci95": [round(c.best.low, 2),
                                       round(c.best.high, 2)], "scheme": c.best.scheme}
    return top1, top5, c.protocol, est


def split_names(budget: int) -> tuple[str, str]:
    return f"select{budget}", f"random{budget}"


def budget_rows(report: Report, model: str, xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray,
                n_classes: int, budget: int, seed: int = 0, draws: int = DRAWS, select: bool = True,
                common: dict | None = None) -> None:
    """Add ``model``'s rows for ``budget`` labels (chosen by select's rule when ``select``; random, over
    ``draws`` draws) to ``report``; a budget that does not fit the train split is skipped with the reason."""
    with torch_threads(1):  # small fits: one thread is several times faster on a shared 2-core machine
        _budget_rows(report, model, xtr, ytr, xte, yte, n_classes, budget, seed, draws, select, common or {})


def _budget_rows(report: Report, model: str, xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray,
                 n_classes: int, budget: int, seed: int, draws: int, select: bool, common: dict) -> None:
    sel_name, rand_name = split_names(budget)
    if budget >= len(ytr):
        if model == "this":
            report.skip(f"the {budget}-label rows", f"{budget} labels need more than the {len(ytr)} training "
                        f"images to choose from; pass a smaller --label-budget")
        return
    if select:
        t = time.perf_counter()
        rows = np.array([p.row for p in choose(_unit(xtr), budget, seed=seed, nredo=SELECT_REDO)])
        pick_s = time.perf_counter() - t
        top1, top5, protocol, est = _score(xtr, ytr, xte, yte, rows, n_classes, seed)
        report.add(model, "fewlabels", sel_name, top1, top5, n_train=int(len(rows)), n_test=len(yte),
                   chosen_by="select (TypiClust: the most typical image of each of the largest k-means clusters)",
                   protocol_chosen=protocol, cv_estimate=est, classes_labelled=int(len(np.unique(ytr[rows]))),
                   select_seconds=round(pick_s, 2), **common)
        report.time("label budget", time.perf_counter() - t)
    t = time.perf_counter()
    accs, top5s, chosen, covered = [], [], Counter(), []
    for d in range(draws):
        rows = np.random.default_rng([seed, d]).choice(len(ytr), budget, replace=False)
        top1, top5, protocol, _ = _score(xtr, ytr, xte, yte, rows, n_classes, seed + d)
        accs.append(top1)
        top5s.append(top5)
        chosen[protocol] += 1
        covered.append(int(len(np.unique(ytr[rows]))))
    report.add(model, "fewlabels", rand_name, float(np.mean(accs)), float(np.mean(top5s)), n_train=budget,
               n_test=len(yte), chosen_by=f"random, {draws} draws (mean; top1_std the spread)",
               top1_std=round(float(np.std(accs)), 3), top1_draws=[round(a, 2) for a in accs], draws=draws,
               protocols_chosen=dict(chosen), classes_labelled=covered, **common)
    report.time("label budget", time.perf_counter() - t)
