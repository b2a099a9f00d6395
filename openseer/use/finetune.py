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

4. Full fine-tune (``--full auto``, the default; ``train/methods/finetune.py`` through the one loop):
   the backbone and a linear head, starting from the linear probe cross-validation preferred. It cannot
   be cross-validated on cached features, so it is judged on the labels alone, once: trained on every
   fold but the first of the same stratified folds, it is scored on that held-out fold against the
   frozen protocol's own held-out predictions there. Only when it wins (``--full yes``: always) is it
   trained again on every label, in ``OUT`` as a run directory (config.yaml, metrics.jsonl,
   checkpoints/, ``--resume``, the ``--minutes`` budget), and the classifier holds the fine-tuned
   backbone. The trial's run is ``OUT/trial/``. Skipped, with the reason, when a held-out fold would be
   too small, with ``--full no``, ``--minutes 0`` or a ``--layer`` other than ``last``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..eval.common import EvalError, open_labelled
from ..eval.fewlabels import Choice, best_linear, choose_protocol, fit_protocol, pile_graph, wilson
from ..fileio import atomic_write_json
from ..rundir import CLASSIFIER, FINETUNE

PIXEL_SIZE = 32  # raw-pixel baseline: the eval geometry at this side (at most the crop)
FULL_MIN_PER_CLASS = 4  # full fine-tune: labels per class for a trial with a held-out fold (k = 4: 3 train, 1 out)
FULL_MIN_HELD_OUT = 8  # ... and held-out images in that fold
FULL_MODES = ("auto", "yes", "no")
TRIAL = "trial"  # OUT/trial/: the run of the held-out trial


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
             workers: int = 0, cache: str | None = None, progress: bool = True, log=print, full: str = "auto",
             minutes: float = 10.0, epochs: float = 0.0, resume: bool = False,
             overrides: tuple[str, ...] = ()) -> dict:
    """Choose, fit and write a classifier (see the module docstring); returns what ``finetune.json`` holds.

    ``full``: auto | yes | no (full fine-tune); ``minutes``: its time budget, half for the trial and half
    for the final run (0: not tried); ``epochs``: its length (0: about 200 steps); ``resume``: continue
    the fine-tune runs already in ``out``; ``overrides``: ``key=value`` config pairs for those runs."""
    from ..eval.features import backbone_features, cache_dir, pixel_features
    from .api import load
    from .classifier import LinearProbs, head_module, save_classifier
    from .embed import embed_pile, reason_counts

    t0 = time.perf_counter()
    out = Path(out).expanduser()
    if full not in FULL_MODES:
        raise EvalError(f"--full must be one of {', '.join(FULL_MODES)}; got {full!r}")
    if minutes < 0:
        raise EvalError(f"--minutes must be >= 0 (0: no full fine-tune); got {minutes:g}")
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out} is a file; give a folder")
    ours = (FINETUNE, "pile", TRIAL, "config.yaml")
    if out.is_dir() and any(out.iterdir()) and not any((out / name).exists() for name in ours):
        raise EvalError(f"--out {out} is not empty and holds no openseer classifier; choose another folder")
    runs = [d for d in (out, out / TRIAL) if (d / "config.yaml").is_file()]
    if runs and not resume and full != "no":
        raise EvalError(f"--out {out} holds a fine-tune run already ({runs[-1]}); continue it with --resume "
                        f"or choose another --out")
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
    fine = _full(full, minutes, epochs, resume, overrides, model, weights, data, train, good, x, y, labelled.n_classes,
                 choice, out, seed, device, workers, progress, log)
    report["full"] = fine.report
    if fine.kept:
        report["trained"] = ("full fine-tune: backbone and linear head trained on every label "
                             f"({fine.report['final']['run_dir']})")
    if len(labelled.test):
        report["test"] = _score_test(model, labelled, head, pixels.protocol, px_size=size, folder=folder,
                                     key=key, batch_size=batch_size, device=device, progress=progress, seed=seed,
                                     x=x, y=y, px=np.asarray(px, np.float32)[good])
        if fine.kept:
            report["test"]["frozen"] = {k: report["test"][k] for k in ("accuracy", "low", "high")}
            right = int((_classify(fine.model, labelled.test.subset(report["test"].pop("rows")), model.transform,
                                   batch_size, device) == labelled.test.labels[report["test"]["ok"]]).sum())
            lo, hi = wilson(right, report["test"]["images"])
            report["test"].update(accuracy=100 * right / max(report["test"]["images"], 1), low=lo, high=hi)
        report["test"].pop("rows", None)
        report["test"].pop("ok", None)
    if fine.kept:
        path = save_classifier(out, fine.model.backbone, model.info, LinearProbs(fine.model.head.weight.detach(),
                               fine.model.head.bias.detach()), labelled.classes, "last", "finetune",
                               extra={"estimate": fine.report["trial"], "labelled": len(y)})
    else:
        path = save_classifier(out, model.backbone, model.info, head_module(head), labelled.classes,
                               model.layer or "last", choice.protocol,
                               extra={"estimate": report["choice"]["estimate"], "labelled": len(y)})
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
            "pixels": {"protocol": pixel_protocol, "accuracy": 100 * pright / max(n, 1), "low": plo, "high": phi},
            "rows": ok.tolist(), "ok": ok}


@dataclass
class Full:
    """The full fine-tune's outcome: what finetune.json says of it, whether its weights are kept, and
    the fine-tuned classifier (backbone + linear head) when they are."""

    report: dict
    kept: bool = False
    model: object = None


def _full_skip(full: str, minutes: float, layer: str, y: np.ndarray, held: list[np.ndarray], scheme: str) -> str:
    """Why a full fine-tune is not tried ('' when it is)."""
    if full == "no":
        return "--full no"
    if minutes <= 0:
        return "no time budget (--minutes 0)"
    if layer != "last":
        return f"a full fine-tune trains a head on the last stage's features; --layer is {layer}"
    if full == "yes":
        return ""
    counts = np.bincount(y)
    smallest = int(counts[counts > 0].min())
    if smallest < FULL_MIN_PER_CLASS or not scheme.startswith("stratified") or not held or \
            len(held[0]) < FULL_MIN_HELD_OUT:
        return (f"too few labels to judge it on a held-out fold: the smallest class has {smallest} "
                f"(a trial needs {FULL_MIN_PER_CLASS} per class and {FULL_MIN_HELD_OUT} held-out images; "
                f"--full yes fine-tunes without one)")
    return ""


def _classify(clf, data, transform, batch_size: int, device: str) -> np.ndarray:
    """Predicted classes of every image of ``data`` (a Labelled split) by a fine-tuned classifier, through
    the eval transform (an unreadable image: -1)."""
    import torch

    from ..eval.common import load_batch

    clf.eval()
    out = np.full(len(data), -1, dtype=np.int64)
    with torch.inference_mode():
        for s in range(0, len(data), batch_size):
            idx = np.arange(s, min(s + batch_size, len(data)))
            bad: list = []
            x = transform.normalize(load_batch(data, idx, transform, bad=bad)).to(device)
            out[idx] = clf(x).argmax(1).cpu().numpy()
            out[[i for i, _ in bad]] = -1
    return out


def _fine_tune(model, run_dir: Path, images, labels: np.ndarray, n_classes: int, protocol: str, x: np.ndarray,
               cfg_args: dict, resume: bool, log):
    """Fine-tune from the linear probe ``protocol`` fitted on (x, labels), through the one loop, in
    ``run_dir``; the trained classifier (from the run's last checkpoint) and the loop's summary."""
    import copy

    import torch

    from ..model.checkpoint_file import latest_checkpoint
    from ..train.loop import train
    from ..train.methods.finetune import Classifier, FinetuneStart, finetune_config

    head = fit_protocol(protocol, x, labels, n_classes)
    w, b = head.folded()
    start = FinetuneStart(model.backbone, w, b, images.collection, labels, n_classes, protocol=protocol)
    cfg = finetune_config(n_images=len(labels), **cfg_args)
    summary = train(cfg, run_dir, start.builder(), resume="auto" if resume else False)
    _, state = latest_checkpoint(run_dir)
    clf = Classifier(copy.deepcopy(model.backbone).cpu(), torch.from_numpy(w), torch.from_numpy(b))
    clf.load_state_dict(state["model"])
    return clf.to(model.device), summary


def _full(full: str, minutes: float, epochs: float, resume: bool, overrides: tuple, model, weights: str, data: str,
          train, good: np.ndarray, x: np.ndarray, y: np.ndarray, n_classes: int, choice: Choice, out: Path,
          seed: int, device: str, workers: int, progress: bool, log) -> Full:
    """Try a full fine-tune (module docstring, 4.) and say what came of it."""
    held, scheme = choice.held, choice.best.scheme if choice.best else "no folds"
    why = _full_skip(full, minutes, model.layer or "last", y, held, scheme)
    start = best_linear(choice)
    report: dict = {"mode": full, "minutes": minutes, "start": start, "tried": not why, "kept": False}
    if why:
        report["reason"] = why
        return Full(report)
    log(f"openseer finetune: full fine-tune ({full}), from {start}, within {minutes:g} minutes")
    cfg_args = dict(arch=model.arch, crop=model.transform.crop, mean=model.transform.mean, std=model.transform.std,
                    stem_stride=int(model.info.get("stem_stride", 0)), seed=seed,
                    device="cuda" if str(device).startswith("cuda") else "cpu", minutes=minutes / 2, epochs=epochs,
                    source=data, workers=workers, progress=progress, overrides=tuple(overrides))
    images = train.subset(good)
    if scheme.startswith("stratified"):
        test = held[0]
        rest = np.setdiff1d(np.arange(len(y)), test)
        clf, summary = _fine_tune(model, out / TRIAL, images.subset(rest), y[rest], n_classes, start, x[rest],
                                  cfg_args, resume, log)
        pred = _classify(clf, images.subset(test), model.transform, 64, str(model.device))
        right = int((pred == y[test]).sum())
        frozen = int((choice.predictions[choice.protocol][test] == y[test]).sum()) if choice.predictions else 0
        began = int((choice.predictions[start][test] == y[test]).sum()) if start in choice.predictions else None
        n = len(test)
        lo, hi = wilson(right, n)
        report["trial"] = {
            "run_dir": str(out / TRIAL), "fold": f"the first of the {scheme} folds", "trained_on": len(rest),
            "held_out": n, "accuracy": 100 * right / n, "low": lo, "high": hi, "scheme": f"held-out fold ({scheme})",
            "frozen": {"protocol": choice.protocol, "accuracy": 100 * frozen / n},
            "start": None if began is None else {"protocol": start, "accuracy": 100 * began / n},
            "steps": summary["step"], "time_budget_reached": summary["time_budget_reached"]}
        wins = right > frozen  # a tie keeps the frozen protocol: as good, cheaper, and its estimate is wider-based
        outcome = ("the fine-tuned weights are kept" if wins else
                   "fine-tuned anyway (--full yes)" if full == "yes" else
                   f"the frozen {choice.protocol} is kept (the fine-tune does not beat it)")
        report["verdict"] = (f"fine-tuned {right}/{n} against {choice.protocol}'s {frozen}/{n} on the same "
                             f"held-out fold: {outcome}")
        if not wins and full != "yes":
            return Full(report)
    else:
        report["trial"] = None
        report["verdict"] = "--full yes: no held-out fold to judge it on (too few labels); fine-tuned without one"
    clf, summary = _fine_tune(model, out, images, y, n_classes, start, x, cfg_args, resume, log)
    report["kept"] = True
    report["final"] = {"run_dir": str(out), "steps": summary["step"],
                       "time_budget_reached": summary["time_budget_reached"]}
    return Full(report, True, clf)


def summary_lines(report: dict) -> list[str]:
    """What ``openseer finetune`` prints: the choice with its interval, against raw pixels; the full
    fine-tune's verdict; the data's own test split when it has one."""
    c, p = report["choice"], report["pixels"]

    def est(d: dict) -> str:
        e = d["estimate"]
        return "no estimate" if e is None else f"{e['accuracy']:.1f}% [{e['low']:.1f}, {e['high']:.1f}] ({e['scheme']})"

    lines = [f"chose {c['protocol']}: cross-validated accuracy {est(c)} on {report['labelled']} labels"]
    if c["note"]:
        lines.append(f"note: {c['note']}")
    lines.append(f"raw pixels on the same labels ({p['protocol']}): {est(p)}")
    f = report.get("full")
    skipped = dict(c["skipped"])
    if f and f["tried"]:
        skipped.pop("finetune", None)
        lines.append(f"full fine-tune (from {f['start']}): {f['verdict']}")
        t = f.get("trial")
        if f["kept"] and t:
            lines.append(f"fine-tuned classifier: held-out accuracy {t['accuracy']:.1f}% [{t['low']:.1f}, "
                         f"{t['high']:.1f}] on {t['held_out']} labels ({t['scheme']}); run {f['final']['run_dir']}")
    elif f:
        skipped["finetune"] = f"full fine-tune: {f['reason']}"
    if "test" in report:
        t = report["test"]
        frozen = f"; frozen {c['protocol']} {t['frozen']['accuracy']:.1f}%" if "frozen" in t else ""
        lines.append(f"on the data's own test split ({t['images']} images): {'fine-tuned ' if frozen else ''}"
                     f"{t['accuracy']:.1f}% [{t['low']:.1f}, {t['high']:.1f}]{frozen}; raw pixels "
                     f"{t['pixels']['accuracy']:.1f}%")
    lines.append(f"not tried: {'; '.join(f'{k}: {v}' for k, v in skipped.items())}")
    return lines


__all__ = ["CLASSIFIER", "finetune", "summary_lines"]
