"""Classifiers from a handful of labels on frozen features, and an honest choice between them.

Protocols (each fits on labelled features and returns class probabilities for any features):

- ``knn``: the weighted cosine kNN vote of ``eval/knn.py`` (votes exp(sim / 0.07)), k = min(20, n).
- ``linear``: multinomial logistic regression on standardised features (the pile's statistics when
  there is a pile), each class weighted inversely to its count (imbalanced labels), full-batch L-BFGS;
  one candidate per L2 weight. It folds into one plain linear layer (timm's classifier).
- ``spread``: label spreading (Zhou et al. 2004) over the cosine kNN graph of the labelled images and
  the unlabelled pile, then a kNN head over the pile's spread labels, so that it predicts for any
  image. Needs the pile's features; the unlabelled pile is what few labels lack.

``choose_protocol`` estimates each candidate by cross-validation on the labels alone (stratified
k-fold, k up to 5 and at most the smallest class's count, when every class has 2 images or more;
else leave-one-out), keeps the best, and reports its
held-out accuracy with a Wilson 95% interval: with 20 labels an estimate is worth +-20 points, and the
interval says so. (Picking the best of several candidates on the same folds flatters the winner a
little; the interval is over the held-out predictions.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..config import OpenseerError
from .knn import TEMPERATURE

KNN_K = 20
L2_GRID = (1e-4, 1e-2, 1.0)
GRAPH_K = 10  # label spreading: neighbours per node
ALPHA = 0.99  # label spreading: weight of the graph against the given labels
SPREAD_ITERS = 200  # at most; a long chain of look-alikes needs many steps to be reached
CV_ITERS = 50  # spreading inside cross-validation: a fixed number of steps for every fold
CHECK_EVERY = 10  # ... but spreading stops once the classes it gives are stable
FOLDS = 5
PSEUDO_MAX = 20000  # spread: the most confident pile rows the kNN head keeps


class FewLabelsError(OpenseerError, ValueError):
    """Labels a classifier cannot be chosen from (what, and how to fix it)."""


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ---------------------------------------------------------------- heads


@dataclass
class LinearHead:
    """Class probabilities softmax(W @ ((x - mean) / std) + b) on the raw features."""

    weight: np.ndarray  # C x D
    bias: np.ndarray  # C
    mean: np.ndarray  # D
    std: np.ndarray  # D

    def proba(self, x: np.ndarray) -> np.ndarray:
        w, b = self.folded()
        return torch.softmax(torch.from_numpy(np.asarray(x, np.float32) @ w.T + b), dim=1).numpy()

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """(W', b') acting on the raw features directly (a plain linear layer, as timm's classifier):
        W' = W / std, b' = b - W' mean."""
        w = self.weight / self.std
        return w.astype(np.float32), (self.bias - w @ self.mean).astype(np.float32)


@dataclass
class KnnHead:
    """Weighted cosine kNN vote over the labelled features."""

    bank: np.ndarray  # N x D unit rows
    labels: np.ndarray
    n_classes: int
    k: int = KNN_K

    def proba(self, x: np.ndarray, chunk: int = 4096) -> np.ndarray:
        bank = torch.from_numpy(np.ascontiguousarray(self.bank, dtype=np.float32))
        labels = torch.from_numpy(np.asarray(self.labels, dtype=np.int64))
        k = min(self.k, len(bank))
        out = np.zeros((len(x), self.n_classes))
        for s in range(0, len(x), chunk):
            top, idx = (torch.from_numpy(_unit(x[s:s + chunk])) @ bank.t()).topk(k, dim=1)
            w = torch.exp((top - 1.0) / TEMPERATURE).double()
            scores = torch.zeros(len(top), self.n_classes, dtype=torch.float64).scatter_add_(1, labels[idx], w)
            out[s:s + chunk] = (scores / scores.sum(1, keepdim=True).clamp_min(1e-30)).numpy()
        return out


def fit_linear(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float, stats: np.ndarray | None = None,
               sample_weight: np.ndarray | None = None, iters: int = 100) -> LinearHead:
    """Class-balanced multinomial logistic regression (L-BFGS) on standardised features; ``stats``:
    rows whose mean/std standardise them (the pile's, when there is one: 10 labels give a poor std)."""
    x = np.asarray(x, dtype=np.float32)
    ref = np.asarray(stats, dtype=np.float32) if stats is not None and len(stats) > 1 else x
    mean = ref.mean(0)
    std = ref.std(0) + 1e-6
    z = torch.from_numpy((x - mean) / std)
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    cw = torch.tensor(np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0), dtype=torch.float32)
    sw = torch.ones(len(y)) if sample_weight is None else torch.as_tensor(sample_weight, dtype=torch.float32)
    sw = sw * cw[yt]
    w = torch.zeros(n_classes, z.shape[1], requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iters, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (F.cross_entropy(z @ w.t() + b, yt, reduction="none") * sw).sum() / sw.sum() + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LinearHead(w.detach().numpy().astype(np.float32), b.detach().numpy().astype(np.float32),
                      mean.astype(np.float32), std.astype(np.float32))


class Graph:
    """The cosine kNN graph of a pile's features (faiss), normalised for label spreading."""

    def __init__(self, pile: np.ndarray, k: int = GRAPH_K):
        import faiss

        self.x = np.ascontiguousarray(_unit(pile))
        n = len(self.x)
        k = max(1, min(k, n - 1))
        index = faiss.IndexFlatIP(self.x.shape[1])
        index.add(self.x)
        sims, ids = index.search(self.x, k + 1)
        rows = np.repeat(np.arange(n), k)
        cols, vals = ids[:, 1:].ravel(), np.maximum(sims[:, 1:].ravel(), 0.0) ** 3
        ij = torch.from_numpy(np.stack([np.concatenate([rows, cols]), np.concatenate([cols, rows])]))
        a = torch.sparse_coo_tensor(ij, torch.from_numpy(np.concatenate([vals, vals]).astype(np.float32)), (n, n),
                                    check_invariants=False).coalesce()  # faiss' ids: valid by construction
        deg = torch.sparse.sum(a, dim=1).to_dense().clamp_min(1e-12)
        d = deg.rsqrt()
        i = a.indices()
        self.s = torch.sparse_coo_tensor(i, a.values() * d[i[0]] * d[i[1]], (n, n), check_invariants=False).coalesce()

    def spread(self, rows: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
        """Class scores of every node after spreading the labels ``y`` of nodes ``rows``."""
        y0 = torch.zeros(len(self.x), n_classes)
        counts = np.bincount(y, minlength=n_classes)
        y0[torch.from_numpy(rows), torch.from_numpy(y)] = torch.from_numpy(1.0 / counts[y]).float()  # balanced
        f, last = y0.clone(), None
        for i in range(1, SPREAD_ITERS + 1):
            f = ALPHA * torch.sparse.mm(self.s, f) + (1 - ALPHA) * y0
            if i % CHECK_EVERY == 0:  # stop once every node is reached and no node's class changed
                now = torch.where(f.sum(1) > 0, f.argmax(1), -1)
                if last is not None and bool((now >= 0).all()) and torch.equal(now, last):
                    break
                last = now
        return f.numpy()

    def influence(self, rows: np.ndarray, iters: int = CV_ITERS) -> np.ndarray:
        """M (L x L): what a unit label at node ``rows[j]`` spreads to node ``rows[i]``. Spreading is
        linear in the labels, so every held-out fold is read from this one pass (no spread per fold)."""
        rows_t = torch.from_numpy(np.asarray(rows))
        y0 = torch.zeros(len(self.x), len(rows))
        y0[rows_t, torch.arange(len(rows))] = 1.0
        f = y0.clone()
        for _ in range(iters):
            f = ALPHA * torch.sparse.mm(self.s, f) + (1 - ALPHA) * y0
        return f[rows_t].numpy()


def fit_spread(graph: Graph, rows: np.ndarray, y: np.ndarray, n_classes: int) -> KnnHead:
    """Spread the labels over the pile, then a kNN head over the pile's most confident spread labels
    (at most ``PSEUDO_MAX`` rows) and the given ones: it follows the pile's shape, which a linear head
    on the same labels cannot (two interleaved classes)."""
    f = graph.spread(rows, y, n_classes)
    p = f / np.maximum(f.sum(1, keepdims=True), 1e-30)
    conf = p.max(1)
    reached = np.flatnonzero(f.sum(1) > 0)
    keep = np.setdiff1d(reached[np.argsort(-conf[reached], kind="stable")[:PSEUDO_MAX]], rows)
    bank = np.concatenate([graph.x[keep], graph.x[rows]])
    return KnnHead(bank, np.concatenate([p.argmax(1)[keep], y]), n_classes)


# ---------------------------------------------------------------- the choice


@dataclass
class Estimate:
    """A protocol's cross-validated accuracy on the labels alone."""

    protocol: str
    accuracy: float  # percent of held-out predictions right
    balanced: float  # mean per-class recall, percent
    low: float  # Wilson 95% interval, percent
    high: float
    n: int  # held-out predictions
    scheme: str


@dataclass
class Choice:
    """The candidates' estimates, the protocol chosen (``best`` is None when the labels allow no
    estimate: ``note`` says why and what was chosen), and what could not be tried (with the reason)."""

    protocol: str
    best: Estimate | None
    estimates: list[Estimate]
    skipped: dict[str, str] = field(default_factory=dict)
    note: str = ""
    held: list[np.ndarray] = field(default_factory=list)  # the held-out folds (index sets), in order
    predictions: dict[str, np.ndarray] = field(default_factory=dict)  # protocol -> held-out predictions (-1: never held out)


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (percent) of a proportion correct/n."""
    if n == 0:
        return 0.0, 100.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


def folds(y: np.ndarray, seed: int = 0, k: int = FOLDS) -> tuple[list[np.ndarray], str]:
    """Held-out index sets: stratified k-fold, with k = min(``k``, the smallest class's count), when
    every class has at least 2 images; else leave-one-out. An image that is the only one of its class
    is never held out (its class would have no example left); a set of such images only gives no folds."""
    counts = np.bincount(y)
    smallest = int(counts[counts > 0].min())
    if smallest >= 2:
        k = min(k, smallest)
        rng = np.random.default_rng(seed)
        fold_of = np.empty(len(y), dtype=np.int64)
        for c in np.flatnonzero(counts):
            members = rng.permutation(np.flatnonzero(y == c))
            fold_of[members] = (np.arange(len(members)) + rng.integers(k)) % k
        return [np.flatnonzero(fold_of == f) for f in range(k)], f"stratified {k}-fold"
    return [np.array([i]) for i in range(len(y)) if counts[y[i]] >= 2], "leave-one-out"


@dataclass
class Protocol:
    """A candidate: ``fit(x, y, rows)`` -> a head with ``proba``; ``held_out(train, test)`` ->
    predictions for the held-out images (by default: fit on ``train``, predict ``test``)."""

    name: str
    fit: Callable
    held_out: Callable | None = None


def candidates(x: np.ndarray, y: np.ndarray, n_classes: int, stats: np.ndarray | None = None,
               graph: Graph | None = None, rows: np.ndarray | None = None) -> tuple[list[Protocol], dict[str, str]]:
    """The protocols that fit these labels, and those left out with why. ``stats``: the rows that
    standardise linear features (the pile's); ``graph``/``rows``: the pile's graph and each labelled
    image's node in it, for spreading (held out by spreading the other labels: no refit per fold)."""
    out = [Protocol("knn", lambda x, y, rows: KnnHead(_unit(x), y, n_classes))]
    for l2 in L2_GRID:
        out.append(Protocol(f"linear(l2={l2:g})", lambda x, y, rows, l2=l2: fit_linear(x, y, n_classes, l2, stats=stats)))
    skipped = {"finetune": "a full fine-tune trains the backbone, so it cannot be cross-validated on cached "
                           "features; openseer finetune judges it on a held-out fold of the labels instead"}
    if graph is not None:
        influence: list[np.ndarray] = []  # computed once, on the first fold

        def spread_held_out(train: np.ndarray, test: np.ndarray) -> np.ndarray:
            if not influence:
                influence.append(graph.influence(rows))
            m = influence[0]
            counts = np.bincount(y[train], minlength=n_classes).astype(np.float64)
            onehot = np.zeros((len(train), n_classes))
            onehot[np.arange(len(train)), y[train]] = 1.0 / counts[y[train]]  # balanced, as ``spread``
            return (m[np.ix_(test, train)] @ onehot).argmax(1)

        out.append(Protocol("spread", lambda x, y, rows: fit_spread(graph, rows, y, n_classes), spread_held_out))
    else:
        skipped["spread"] = "needs the unlabelled pile's features"
    return out, skipped


DEFAULT_PROTOCOL = "linear(l2=0.01)"


def choose_protocol(x: np.ndarray, y: np.ndarray, n_classes: int, pile: np.ndarray | None = None,
                    pile_rows: np.ndarray | None = None, seed: int = 0, graph: Graph | None = None) -> Choice:
    """Cross-validate every candidate on (x, y) and return the choice.

    ``pile``: the unlabelled pile's features (spreading uses them); ``pile_rows``: for each labelled
    image, its row in ``pile`` (-1 when it is not there: it is then added to the graph); ``graph``:
    the pile's ``Graph`` when it is already built (every labelled image then in the pile).
    """
    y = np.asarray(y, dtype=np.int64)
    if len(y) < 2 or len(np.unique(y)) < 2:
        raise FewLabelsError(f"a classifier needs at least 2 labelled images of 2 classes; got {len(y)} "
                             f"image(s) of {len(np.unique(y))} class(es)")
    graph, rows = pile_graph(x, pile, pile_rows, graph) if pile is not None else (None, None)
    protocols, skipped = candidates(x, y, n_classes, pile, graph, rows)
    held, scheme = folds(y, seed)
    if not held:
        pick = "spread" if graph is not None else DEFAULT_PROTOCOL
        return Choice(pick, None, [], skipped,
                      note=f"no estimate: every class has one labelled image, so none can be held out; chose "
                           f"{pick} without one. Label a second image of some classes for an estimate")
    tested = np.concatenate(held)
    estimates, predictions = [], {}
    for p in protocols:
        pred = np.full(len(y), -1, dtype=np.int64)
        for test in held:
            train = np.setdiff1d(np.arange(len(y)), test)
            if p.held_out is not None:
                pred[test] = p.held_out(train, test)
            else:
                pred[test] = p.fit(x[train], y[train], rows[train] if rows is not None else None).proba(x[test]).argmax(1)
        predictions[p.name] = pred
        right = int((pred[tested] == y[tested]).sum())
        recalls = [float((pred[tested][y[tested] == c] == c).mean()) for c in np.unique(y[tested])]
        lo, hi = wilson(right, len(tested))
        estimates.append(Estimate(p.name, 100 * right / len(tested), 100 * float(np.mean(recalls)), lo, hi,
                                  len(tested), scheme))
    # ties (common with a few labels: every protocol right on every held-out image) go to the protocol
    # that uses the most: spreading (the pile), then the linear heads (most regularised first), then kNN
    order = {p.name: i for i, p in enumerate(reversed(protocols))}
    best = max(estimates, key=lambda e: (round(e.balanced, 6), round(e.accuracy, 6), -order[e.protocol]))
    note = "" if len(tested) == len(y) else (f"{len(y) - len(tested)} images are the only ones of their class and "
                                            f"were never held out")
    return Choice(best.protocol, best, estimates, skipped, note, held, predictions)


def pile_graph(x: np.ndarray, pile: np.ndarray, pile_rows: np.ndarray | None,
           built: Graph | None = None) -> tuple[Graph, np.ndarray]:
    """The graph of the pile plus the labelled images not in it, and each labelled image's node
    (``built``: the pile's graph, reused when every labelled image is in the pile)."""
    pile_rows = np.full(len(x), -1) if pile_rows is None else np.asarray(pile_rows)
    extra = np.flatnonzero(pile_rows < 0)
    if built is not None and not len(extra):
        return built, pile_rows
    rows = pile_rows.copy()
    rows[extra] = len(pile) + np.arange(len(extra))
    return Graph(np.concatenate([pile, x[extra]]) if len(extra) else pile), rows


def fit_protocol(name: str, x: np.ndarray, y: np.ndarray, n_classes: int, pile: np.ndarray | None = None,
                 pile_rows: np.ndarray | None = None, graph: Graph | None = None):
    """The head of protocol ``name`` fitted on all the labels (what ``choose_protocol`` chose)."""
    y = np.asarray(y, dtype=np.int64)
    graph, rows = pile_graph(x, pile, pile_rows, graph) if name == "spread" and pile is not None else (None, None)
    protocols, _ = candidates(x, y, n_classes, pile, graph, rows)
    found = {p.name: p for p in protocols}
    if name not in found:
        raise FewLabelsError(f"protocol {name!r} is not available here; choose from {', '.join(found)}")
    return found[name].fit(x, y, rows)


def best_linear(choice: Choice) -> str:
    """The linear candidate with the best cross-validated estimate (the chosen one when it is linear;
    the default without estimates): the head a full fine-tune starts from."""
    if choice.protocol.startswith("linear"):
        return choice.protocol
    linear = [e for e in choice.estimates if e.protocol.startswith("linear")]
    if not linear:
        return DEFAULT_PROTOCOL
    return max(linear, key=lambda e: (round(e.balanced, 6), round(e.accuracy, 6), e.protocol)).protocol
