"""``openseer finetune``: a classifier from a handful of labels, chosen honestly.

1. The labelled images (a CSV of path,label, class folders, or fashion-mnist) are embedded with the
   model's eval transform (cached, as ``openseer eval`` caches); bad files are skipped and counted by
   reason. With ``--pile`` the unlabelled pile is embedded too (resumable, ``OUT/pile/``): label
   spreading uses it.
2. The protocols that fit (``eval/fewlabels.py``: weighted kNN, class-balanced linear heads, label
   spreading) are cross-validated on the labels alone; the best is chosen and its estimate reported
   with a 95% interval. The same is done on raw pixels, so the user sees on their own labels whether
   the features help.
3. The chosen head is fitted on every label and written with the backbone and the class names as
   ``OUT/classifier.safetensors`` (``use/classifier.py``); ``OUT/finetune.json`` records the choice.
   When the labelled data has its own test split (fashion-mnist's, ``train/`` + ``val/`` folders, a
   CSV split column) the classifier and the pixel baseline are also scored on it.

Frozen features: the backbone is not trained. A full fine-tune cannot be cross-validated on cached
features, which is what a handful of labels allows, and is reported as not tried.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..eval.common import EvalError, open_labelled
from ..eval.fewlabels import Choice, choose_protocol, fit_protocol, pile_graph, wilson
from ..fileio import atomic_write_json
from ..rundir import CLASSIFIER, FINETUNE

PIXEL_SIZE = 32  # raw-pixel baseline: the eval geometry at this side (at most the crop)


def _choice_dict(c: Choice) -> dict:
    return {"protocol": c.protocol, "note": c.note, "skipped": c.skipped,
            "estimate": None if c.best is None else vars(c.best), "candidates": [vars(e) for e in c.estimates]}


def _pile_rows(pile_rows_index: list[dict], keys: list[str], paths: list | None) -> np.ndarray:
    """For each labelled image, its row in the embedded pile (by key, or by resolved path), else -1."""
    where: dict[str, int] = {}
    for i, r in enumerate(pile_rows_index):
        where[r["key"]] = i
        if r.get("path") and "#" not in r["path"]:
            where[str(Path(r["path"]).resolve())] = i
    out = np.full(len(keys), -1, dtype=np.int64)
    for j, k in enumerate(keys):
        hit = where.get(k)
        if hit is None and paths is not None:
            hit = where.get(str(Path(paths[j]).resolve()))
        if hit is not None:
            out[j] = hit
    return out


def finetune(weights: str, data: str, out: str | Path, pile: str = "", layer: str = "last", seed: int = 0,
             limit_train: int = 0, skip_missing: bool = False, device: str = "cpu", batch_size: int = 64,
             workers: int = 0, cache: str | None = None, progress: bool = True, log=print) -> dict:
    """Choose, fit and write a classifier (see the module docstring); returns what ``finetune.json`` holds."""
    from ..eval.features import backbone_features, cache_dir, pixel_features
    from .api import load
    from .classifier import head_module, save_classifier
    from .embed import embed_pile, reason_counts

    t0 = time.perf_counter()
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / FINETUNE).is_file() and not (out / "pile").is_dir():
        raise EvalError(f"--out {out} is not empty and holds no openseer classifier; choose another folder")
    labelled = open_labelled(data, seed=seed, test_fraction=0.0, skip_missing=skip_missing, limit_train=limit_train)
    model = load(weights, device=device, layer=layer)
    folder = cache_dir(cache) if cache != "" else None
    train = labelled.train
    log(f"openseer finetune: {len(train)} labelled images of {labelled.n_classes} classes ({labelled.name}) "
        f"on {model.arch} ({model.feature_dim}-d {model.layer or 'last'} features)")
    key = f"{model.info['weights_hash']}:{model.layer or 'last'}"
    x, bad, _ = backbone_features(model.features, key, train, model.transform, folder, batch_size, device,
                                  progress, "labelled", layer=model.layer or "last")
    good = np.setdiff1d(np.arange(len(train)), [i for i, _ in bad])
    x, y = np.asarray(x, np.float32)[good], train.labels[good]
    keys = [train.keys[i] for i in good]
    paths = [train.paths[i] for i in good] if train.paths is not None else None
    if len(np.unique(y)) < 2:
        raise EvalError(f"after skipping {len(bad)} unreadable images, {len(y)} labelled images of "
                        f"{len(np.unique(y))} class(es) are left: a classifier needs 2 classes")

    pile_x = rows = None
    pile_info: dict = {"given": False}
    if pile:
        pile_x, index, _ = embed_pile(model, pile, out / "pile", normalize=False, batch_size=batch_size,
                                      workers=workers, progress=progress)
        rows = _pile_rows(index, keys, paths)
        pile_info = {"given": True, "spec": pile, "images": len(pile_x), "labelled_in_pile": int((rows >= 0).sum())}
    graph = None
    if pile_x is not None:  # built once: the choice and the fit share it
        graph, rows = pile_graph(x, pile_x, rows)
    choice = choose_protocol(x, y, labelled.n_classes, pile=pile_x, pile_rows=rows, seed=seed, graph=graph)
    head = fit_protocol(choice.protocol, x, y, labelled.n_classes, pile=pile_x, pile_rows=rows, graph=graph)

    size = min(PIXEL_SIZE, model.transform.crop)
    px, _, _ = pixel_features(train, size, folder, progress=False)
    pixels = choose_protocol(np.asarray(px, np.float32)[good], y, labelled.n_classes, seed=seed)

    report = {
        "format": "openseer.finetune.v1", "weights": weights, "arch": model.arch, "layer": model.layer or "last",
        "data": labelled.describe() | {"split": labelled.split}, "classes": labelled.classes,
        "labelled": len(y), "per_class": np.bincount(y, minlength=labelled.n_classes).tolist(),
        "bad": len(bad), "bad_by_reason": reason_counts(r for _, r in bad), "pile": pile_info, "seed": seed,
        "choice": _choice_dict(choice), "pixels": _choice_dict(pixels) | {"side": size},
        "trained": "frozen features: the backbone is not trained, the head is fitted on every label",
    }
    if len(labelled.test):
        report["test"] = _score_test(model, labelled, head, pixels.protocol, px_size=size, folder=folder,
                                     key=key, batch_size=batch_size, device=device, progress=progress, seed=seed,
                                     x=x, y=y, px=np.asarray(px, np.float32)[good])
    path = save_classifier(out, model.backbone, model.info, head_module(head), labelled.classes, model.layer or "last",
                           choice.protocol, extra={"estimate": report["choice"]["estimate"], "labelled": len(y)})
    report["files"] = {"classifier": str(path), "report": str(out / FINETUNE)}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(out / FINETUNE, report)
    return report


def _score_test(model, labelled, head, pixel_protocol: str, px_size: int, folder, key: str, batch_size: int,
                device: str, progress: bool, seed: int, x: np.ndarray, y: np.ndarray, px: np.ndarray) -> dict:
    """Accuracy (with a Wilson interval) of the classifier and of the pixel baseline on the data's own
    test split: what the cross-validated estimate is checked against."""
    from ..eval.features import backbone_features, pixel_features

    test = labelled.test
    tx, tbad, _ = backbone_features(model.features, key, test, model.transform, folder, batch_size, device,
                                    progress, "test", layer=model.layer or "last")
    ok = np.setdiff1d(np.arange(len(test)), [i for i, _ in tbad])
    ty = test.labels[ok]
    right = int((head.proba(np.asarray(tx, np.float32)[ok]).argmax(1) == ty).sum())
    tpx, _, _ = pixel_features(test, px_size, folder, progress=False)
    pixel_head = fit_protocol(pixel_protocol, px, y, labelled.n_classes)
    pright = int((pixel_head.proba(np.asarray(tpx, np.float32)[ok]).argmax(1) == ty).sum())
    n = len(ty)
    lo, hi = wilson(right, n)
    plo, phi = wilson(pright, n)
    return {"images": n, "accuracy": 100 * right / max(n, 1), "low": lo, "high": hi,
            "pixels": {"protocol": pixel_protocol, "accuracy": 100 * pright / max(n, 1), "low": plo, "high": phi}}


def summary_lines(report: dict) -> list[str]:
    """What ``openseer finetune`` prints: the choice with its interval, against raw pixels."""
    c, p = report["choice"], report["pixels"]

    def est(d: dict) -> str:
        e = d["estimate"]
        return "no estimate" if e is None else f"{e['accuracy']:.1f}% [{e['low']:.1f}, {e['high']:.1f}] ({e['scheme']})"

    lines = [f"chose {c['protocol']}: cross-validated accuracy {est(c)} on {report['labelled']} labels"]
    if c["note"]:
        lines.append(f"note: {c['note']}")
    lines.append(f"raw pixels on the same labels ({p['protocol']}): {est(p)}")
    if "test" in report:
        t = report["test"]
        lines.append(f"on the data's own test split ({t['images']} images): {t['accuracy']:.1f}% "
                     f"[{t['low']:.1f}, {t['high']:.1f}]; raw pixels {t['pixels']['accuracy']:.1f}%")
    lines.append(f"not tried: {'; '.join(f'{k}: {v}' for k, v in c['skipped'].items())}")
    return lines


__all__ = ["CLASSIFIER", "finetune", "summary_lines"]
