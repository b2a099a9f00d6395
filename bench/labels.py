"""The label-efficiency curve: accuracy on Fashion-MNIST's test set from 10 to 600 labels.

    .venv/bin/python bench/labels.py --model runs/demo --pile 20000
    .venv/bin/python bench/labels.py --model runs/a --budgets 10,20,50,100 --seeds 5 --sets openseer,pixels

For each feature set (openseer's model, the same architecture with random weights, raw pixels), each
budget and each seed, the labels are chosen two ways from the unlabelled pile (the first ``--pile``
images of Fashion-MNIST's train split, labels unused): at random, and by ``openseer select``'s rule
(``use/select.py``: the most typical image of each of the largest k-means clusters, on the same
features). ``openseer finetune``'s choice (``eval/fewlabels.py``: cross-validation on the labels alone
between kNN, linear heads and label spreading over the pile) is then fitted and scored on the 10,000
test images. Reported per cell: mean and spread of the test accuracy over the seeds, the protocols
chosen, and how often the test accuracy fell inside the cross-validated 95% interval. One JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter

import numpy as np
import torch

from openseer.data.collection import load_fashion_mnist
from openseer.eval.fewlabels import Graph, choose_protocol, fit_protocol
from openseer.use.api import load
from openseer.use.select import choose


def _features(model, images: torch.Tensor, batch: int = 512) -> np.ndarray:
    out = []
    for s in range(0, len(images), batch):
        out.append(model.embed(images[s:s + batch], batch_size=batch))
    return np.concatenate(out)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="openseer's weights (a run directory, exported file)")
    p.add_argument("--budgets", default="10,20,50,100,200,600")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--pile", type=int, default=60000, help="unlabelled pile: the first N train images")
    p.add_argument("--sets", default="openseer,random_init,pixels", help="feature sets to measure")
    p.add_argument("--layer", default="s3+s4", help="openseer's features (as eval --layer; the demo's: s3+s4)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (1 suits the small fits; default torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    xtr, ytr = xtr[:args.pile], ytr[:args.pile].numpy()
    yte = yte.numpy()
    budgets = [int(b) for b in args.budgets.split(",")]
    results: dict = {}
    seconds: dict = {}
    for name in args.sets.split(","):
        t1 = time.perf_counter()
        if name == "pixels":
            pile = xtr.flatten(1).float().numpy() / 255
            test = xte.flatten(1).float().numpy() / 255
        else:
            model = load(args.model, random_init=name == "random_init", layer=args.layer)
            pile, test = _features(model, xtr), _features(model, xte)
        graph = Graph(pile)
        unit = _unit(pile)
        features_s = time.perf_counter() - t1
        cells: dict = {}
        for budget in budgets:
            for strategy in ("random", "select"):
                accs, inside, chosen, estimates = [], 0, Counter(), []
                for seed in range(args.seeds):
                    if strategy == "random":
                        rows = np.random.default_rng(seed).choice(len(pile), budget, replace=False)
                    else:
                        rows = np.array([q.row for q in choose(unit, budget, seed=seed)])
                    y = ytr[rows]
                    if len(np.unique(y)) < 2:
                        accs.append(100.0 * float(np.mean(yte == y[0])))
                        chosen["one class"] += 1
                        continue
                    c = choose_protocol(pile[rows], y, 10, pile=pile, pile_rows=rows, seed=seed, graph=graph)
                    head = fit_protocol(c.protocol, pile[rows], y, 10, pile=pile, pile_rows=rows, graph=graph)
                    acc = 100.0 * float((head.proba(test).argmax(1) == yte).mean())
                    accs.append(acc)
                    chosen[c.protocol] += 1
                    if c.best is not None:
                        inside += int(c.best.low <= acc <= c.best.high)
                        estimates.append(c.best.accuracy)
                cells[f"{strategy}_{budget}"] = {
                    "mean": round(float(np.mean(accs)), 2), "std": round(float(np.std(accs)), 2),
                    "protocols": dict(chosen), "in_interval": f"{inside}/{len(estimates)}",
                    "cv_mean": round(float(np.mean(estimates)), 2) if estimates else None}
                print(f"bench: {name} {strategy} {budget}: {cells[f'{strategy}_{budget}']}", file=sys.stderr, flush=True)
        results[name] = cells
        seconds[name] = {"features_and_graph": round(features_s, 1), "total": round(time.perf_counter() - t1, 1)}
    print(json.dumps({"bench": "labels", "model": args.model, "layer": args.layer, "pile": args.pile, "budgets": budgets,
                      "seeds": args.seeds, "results": results, "seconds": seconds,
                      "total_s": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
