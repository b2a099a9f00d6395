"""``evaluate(options)``: every protocol and baseline for one set of weights, into one report.

Order of work: load weights and data; extract (or reuse cached) features once (deny-listed and
undecodable images skipped and counted by reason); kNN and the linear probe on all labels; fixed
low-shot subsets saved as split files; on each subset kNN, the linear probe and a full fine-tune; the
same for the baselines; a labelling budget (labelbudget.py: N labels chosen by select's rule against N
random ones, and raw pixels); eval.json + eval.md.

A small labelled set is reported for what it can tell: a k that would let every labelled image vote,
a low-shot split that repeats another or takes every image, a budget larger than the train split are
skipped with the reason; every result carries its test size, a Wilson 95% interval and a flag when it
is no better than guessing the most common test class (report.py).
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..device import resolve_device
from ..model.load import load_backbone
from ..rundir import EVAL, check_writable
from .baselines import PIXELS_SIZE, pixels, random_init, supervised_scratch
from .common import EvalError, EvalTransform, LabelledData, open_labelled, read_for, warn
from .features import backbone_features, cache_dir
from .knn import DEFAULT_KS, TEMPERATURE, knn_eval
from .labelbudget import DRAWS, budget_rows
from .layers import LAST, describe_layer, feature_model, layer_label, parse_layer
from .linear import linear_probe
from .lowshot import FinetuneSettings, auto_epochs, finetune, lowshot_splits, save_split
from .report import Report

PROTOCOLS = ("knn", "linear", "lowshot", "baselines", "fewlabels")
LOWSHOT_PROTOCOLS = ("knn", "linear", "finetune")  # what runs on each low-shot subset


@dataclass
class EvalOptions:
    """Everything ``openseer eval`` can be told (see ``openseer eval --help``)."""

    weights: str | None = None
    backbone: str | None = None
    random_init: bool = False
    data: str = "fashion-mnist"
    out: str | None = None
    protocols: tuple[str, ...] = PROTOCOLS
    seed: int = 0
    cache_dir: str | None = None
    no_cache: bool = False
    batch_size: int = 256
    skip_missing: bool = False
    ks: tuple[int, ...] = DEFAULT_KS
    temperature: float = TEMPERATURE
    layer: str = LAST  # frozen-feature protocols: 'last', a stage name, or stages joined by '+'
    percents: tuple[float, ...] = (1, 10)
    lowshot_protocols: tuple[str, ...] = LOWSHOT_PROTOCOLS  # without finetune: no supervised-from-scratch either
    per_class: tuple[int, ...] = ()
    label_budget: int = 100  # fewlabels: N labels chosen by select's rule against N random ones
    label_draws: int = DRAWS  # fewlabels: random draws of N labels (mean and spread)
    finetune_epochs: int = 0  # 0 = auto: about finetune_images images seen per subset
    finetune_images: int = 60000  # 10% of Fashion-MNIST, current protocol: 30k images 84.1%, 60k 86.0%
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    limit_train: int = 0
    limit_test: int = 0
    test_fraction: float = 0.2
    recipe: str | None = None
    crop_size: int = 0
    pixels_size: int = PIXELS_SIZE
    device: str = "auto"
    threads: int = 0
    progress: bool = True
    command: str = ""
    leakage: str = ""  # '', 'report' or 'exclude': search the pretraining pile for the eval images (leakage.py)
    pile: str = ""  # the pretraining pile the leakage audit searches (default: the run's data.source)


def default_out(opts: EvalOptions) -> Path:
    """RUN/eval.json for a run dir; <file>-eval/eval.json beside a file; ./eval-<arch>/eval.json for a name."""
    if opts.weights and Path(opts.weights).is_dir():
        return Path(opts.weights) / EVAL
    if opts.weights and Path(opts.weights).is_file():
        p = Path(opts.weights)
        return p.parent / f"{p.stem}-eval" / EVAL
    name = opts.weights or opts.backbone or "model"
    return Path(f"eval-{name}{'-random' if opts.random_init else ''}") / EVAL


def _check_writable(folder: Path) -> None:
    check_writable(folder, EvalError, "cannot write the report to {}")


class _Run:
    """State shared by the stages of one evaluation."""

    def __init__(self, opts: EvalOptions):
        self.opts = opts
        self.device = resolve_device(opts.device)
        self.cache = None if opts.no_cache else cache_dir(opts.cache_dir)
        self.say = (lambda text: print(f"openseer: {text}", file=sys.stderr)) if opts.progress else (lambda text: None)
        self.stages: tuple[str, ...] = ()
        self._pixels: tuple[np.ndarray, np.ndarray] | None = None

    def features(self, model, info: dict, data: LabelledData, transform: EvalTransform, label: str):
        """(train, test) features of the chosen layer, from the cache when possible; undecodable
        images handled once."""
        t0 = time.perf_counter()
        out = []
        for split_name in ("train", "test"):
            split = getattr(data, split_name)
            feats, bad, hit = backbone_features(feature_model(model, self.stages), info["weights_hash"], split,
                                                transform, self.cache, self.opts.batch_size, self.device,
                                                self.opts.progress, f"{label} {split_name}",
                                                describe_layer(self.stages))
            if bad:
                feats = self._drop_bad(data, split_name, feats, bad)
            out.append(feats)
            self.say(f"{label} {split_name} features {feats.shape} {'from cache' if hit else 'extracted'}")
        return out[0], out[1], time.perf_counter() - t0

    def pixels(self, data: LabelledData, report: Report) -> tuple[np.ndarray, np.ndarray]:
        """Raw-pixel (train, test) features, once per evaluation (and from the cache when there)."""
        if self._pixels is None:
            t = time.perf_counter()
            self._pixels = pixels(data.train, data.test, self.cache, self.opts.pixels_size, self.opts.progress)
            report.time("features", time.perf_counter() - t)
        return self._pixels

    def _drop_bad(self, data: LabelledData, split_name: str, feats: np.ndarray, bad: list) -> np.ndarray:
        """Skip the images that could not be used, counted by their reason (``denied``: on the
        deny-list, ``corrupt``, ``truncated``...: data/collection.py REASONS), as every pile reader does."""
        split = getattr(data, split_name)
        names = [str(split.paths[i]) if split.paths else split.keys[i] for i, _ in bad]
        counts = Counter(str(reason).split(":")[0] for _, reason in bad)
        by_reason = ", ".join(f"{r} {n}" for r, n in sorted(counts.items()))
        listed = "\n  ".join(f"{n}: {reason}" for n, (_, reason) in zip(names[:20], bad[:20]))
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        warn(f"skipped {len(bad)} {split_name} images ({by_reason}):\n  {listed}{more}")
        keep = np.setdiff1d(np.arange(len(split)), [i for i, _ in bad])
        if not len(keep):
            raise EvalError(f"{data.name}: every {split_name} image was skipped ({by_reason})")
        setattr(data, split_name, split.subset(keep))
        data.notes.append(f"skipped {len(bad)} {split_name} images: {by_reason}")
        for r, n in counts.items():
            data.skipped[r] = data.skipped.get(r, 0) + n
        return np.asarray(feats[keep])


def evaluate(opts: EvalOptions) -> dict:
    """Run the protocols in ``opts.protocols`` and the baselines; write eval.json/eval.md; return the report."""
    unknown = [p for p in opts.protocols if p not in PROTOCOLS]
    if unknown or not opts.protocols:
        raise EvalError(f"unknown protocol(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(PROTOCOLS)}")
    unknown = [p for p in opts.lowshot_protocols if p not in LOWSHOT_PROTOCOLS]
    if unknown or not opts.lowshot_protocols:
        raise EvalError(f"unknown low-shot protocol(s) {', '.join(unknown) or '(none given)'}; "
                        f"choose from {', '.join(LOWSHOT_PROTOCOLS)}")
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    run = _Run(opts)
    t0 = time.perf_counter()
    model, info = load_backbone(opts.weights, random_init=opts.random_init, arch=opts.backbone,
                                recipe=opts.recipe, seed=opts.seed)
    run.stages = parse_layer(opts.layer, model, info["arch"])
    data = open_labelled(opts.data, opts.seed, opts.test_fraction, opts.skip_missing, opts.limit_train,
                         opts.limit_test)
    out = Path(opts.out) if opts.out else default_out(opts)
    _check_writable(out.parent)
    leak = None
    if opts.leakage:  # before anything reads the data: `exclude` changes the test split
        from .leakage import audit, run_pile

        leak = audit(data, run_pile(info, opts.pile), opts.leakage, out.with_name(f"{out.stem}-leakage.csv"),
                     run.say, opts.progress)
    crop = opts.crop_size or info["crop_size"]
    transform = EvalTransform(crop, tuple(info["mean"]), tuple(info["std"]))
    read_for(data, transform)  # a one-channel backbone reads its files at full depth
    run.say(f"evaluating {info['source']} ({info['arch']}, weights {info['weights_hash']}) on {data.name}: "
            f"{len(data.train)} train / {len(data.test)} test, {data.n_classes} classes -> {out}")
    header_info = {k: v for k, v in info.items() if k != "config"}
    report = Report({"format": "openseer.eval.v1", "command": opts.command, "weights": header_info,
                     "data": {}, "transform": transform.describe(), "feature_layer": describe_layer(run.stages),
                     "seed": opts.seed, "protocols": list(opts.protocols), "device": str(run.device),
                     "options": {k: v for k, v in asdict(opts).items() if k not in ("finetune", "command")}})
    if leak is not None:
        report.header["leakage"] = leak.describe()
        report.notes.append(leak.note())
    report.time("load", time.perf_counter() - t0)

    ftr, fte, secs = run.features(model, info, data, transform, "model")
    report.time("features", secs)
    report.header["data"] = data.describe()  # after any undecodable images were dropped
    if len(data.test):
        report.chance = 100.0 * float(np.bincount(data.test.labels).max()) / len(data.test)
        report.header["data"]["chance_top1"] = round(report.chance, 3)
    common = {"seed": opts.seed, "feature_layer": layer_label(run.stages), "weights_hash": info["weights_hash"]}
    do = set(opts.protocols)

    splits: dict[str, dict] = {}
    if do & {"lowshot", "baselines"}:
        fingerprint = data.train.fingerprint()
        left_out: dict[str, str] = {}
        splits = lowshot_splits(data.train, data.classes, opts.seed, opts.percents, opts.per_class, left_out)
        for name, why in left_out.items():
            report.skip(f"the {name} low-shot split", why)
        for name, sp in splits.items():
            sp["path"] = str(save_split(out.parent, name, sp, data.train, data.name, fingerprint, opts.seed))
        report.header["lowshot_splits"] = {n: {"path": sp["path"], "n": int(len(sp["indices"])), "rule": sp["rule"]}
                                           for n, sp in splits.items()}

    # kNN + linear probe: on all labels as asked, and on each low-shot subset when low-shot is asked
    frozen = {"knn", "linear"} & set(opts.lowshot_protocols)
    sub_plan = [(name, frozen) for name in splits] if "lowshot" in do else []
    tune = "finetune" in opts.lowshot_protocols
    this_plan = [("full", do & {"knn", "linear"}), *sub_plan]
    base_plan = [("full", {"knn", "linear"}), *sub_plan]
    pcommon = {"seed": opts.seed, "feature_layer": f"raw pixels {opts.pixels_size}x{opts.pixels_size}",
               "weights_hash": None}
    baselines = []  # (model, train features, test features, common): their features first, then every probe
    if "baselines" in do:
        if not info["random_init"]:
            rmodel, rinfo = random_init(info["arch"], opts.seed, info.get("stem_stride", 0))
            rtr, rte, secs = run.features(rmodel, rinfo, data, transform, "random init")
            report.time("features", secs)
            baselines.append(("random_init", rtr, rte, {**common, "weights_hash": rinfo["weights_hash"],
                                                         "init": rinfo["init"]}))
        ptr, pte = run.pixels(data, report)
        baselines.append(("pixels", ptr, pte, pcommon))
    # every linear probe (most of an evaluation's time) side by side, one thread each: the same results
    t = time.perf_counter()
    probes = _linear_probes([("this", ftr, fte, this_plan), *[(m, a, b, base_plan) for m, a, b, _ in baselines]],
                            data, splits, opts.seed)
    report.time("linear", time.perf_counter() - t)
    _feature_protocols(report, run, "this", ftr, fte, data, splits, this_plan, common, linear=probes["this"])

    settings = {name: replace(opts.finetune, epochs=opts.finetune_epochs
                              or auto_epochs(len(sp["indices"]), opts.finetune_images))
                for name, sp in splits.items()}
    if "lowshot" in do and tune:
        for name, sp in splits.items():
            t = time.perf_counter()
            r = finetune(model, info["arch"], data.train.subset(sp["indices"]), data.test, transform,
                         data.n_classes, settings[name], opts.seed, run.device, opts.progress, f"fine-tune {name}")
            report.add("this", "finetune", name, r.pop("top1"), r.pop("top5"), n_train=int(len(sp["indices"])),
                       n_test=len(data.test), **{**common, "feature_layer": layer_label(())}, **r)
            report.time("finetune", time.perf_counter() - t)
            run.say(f"fine-tune {name}: top-1 {report.results[-1]['top1']:.2f}")

    if "baselines" in do:
        if info["random_init"]:
            report.notes.append("the evaluated weights are themselves a random init; the random-init baseline is skipped")
        for m, a, b, c in baselines:
            _feature_protocols(report, run, m, a, b, data, splits, base_plan, c, linear=probes[m])
        for name, sp in (splits if tune else {}).items():
            t = time.perf_counter()
            r = supervised_scratch(info["arch"], data.train.subset(sp["indices"]), data.test, transform,
                                   data.n_classes, settings[name], opts.seed, run.device, opts.progress,
                                   f"scratch {name}", stem_stride=info.get("stem_stride", 0))
            report.add("scratch", "finetune", name, r.pop("top1"), r.pop("top5"), n_train=int(len(sp["indices"])),
                       n_test=len(data.test), seed=opts.seed, feature_layer=None, weights_hash=None, **r)
            report.time("scratch", time.perf_counter() - t)
            run.say(f"supervised from scratch {name}: top-1 {report.results[-1]['top1']:.2f}")

    if "fewlabels" in do and len(data.test):
        ytr, yte = data.train.labels, data.test.labels
        budget_rows(report, "this", ftr, ytr, fte, yte, data.n_classes, opts.label_budget, opts.seed,
                    opts.label_draws, common=common)
        ptr, pte = run.pixels(data, report)
        budget_rows(report, "pixels", ptr, ytr, pte, yte, data.n_classes, opts.label_budget, opts.seed,
                    opts.label_draws, select=False, common=pcommon)
        run.say(f"{opts.label_budget} labels: " + ", ".join(
            f"{x['model']} {x['split']} {x['top1']:.1f}" for x in report.results if x["protocol"] == "fewlabels"))

    return report.write(out)


def _linear_probes(models: list[tuple[str, np.ndarray, np.ndarray, list[tuple[str, set]]]], data: LabelledData,
                   splits: dict, seed: int) -> dict[str, dict[str, dict]]:
    """``linear_probe`` of each (model, train features, test features, plan) on each split of its plan
    that asks for it: model -> split -> result. The probes run side by side in threads, the largest
    first: each computes on one thread (``linear_probe``), so the results are those of running them
    one after another."""
    from concurrent.futures import ThreadPoolExecutor

    from .linear import torch_threads

    def one(ftr: np.ndarray, fte: np.ndarray, rows: np.ndarray | None) -> dict:
        ytr = data.train.labels if rows is None else data.train.labels[rows]
        return linear_probe(ftr, ytr, fte, data.test.labels, data.n_classes, seed, train_rows=rows)

    todo = [(m, split, a, b, None if split == "full" else splits[split]["indices"])
            for m, a, b, plan in models for split, do in plan if "linear" in do]
    todo.sort(key=lambda j: -(len(data.train.labels) if j[4] is None else len(j[4])) * j[2].shape[1])
    out: dict[str, dict[str, dict]] = {m: {} for m, *_ in models}
    with torch_threads(1), ThreadPoolExecutor(max_workers=max(1, min(len(todo), os.cpu_count() or 1))) as pool:
        jobs = [(m, split, pool.submit(one, a, b, rows)) for m, split, a, b, rows in todo]
        for m, split, job in jobs:
            out[m][split] = job.result()
    return out


def _feature_protocols(report: Report, run: _Run, model: str, ftr: np.ndarray, fte: np.ndarray,
                       data: LabelledData, splits: dict, plan: list[tuple[str, set]], common: dict,
                       linear: dict[str, dict]) -> None:
    """kNN on frozen features and the linear probes' results (``linear``: by split, run already by
    ``_linear_probes``) into the report, for each (split, protocols) in ``plan``."""
    opts = run.opts
    for split, do in plan:
        if not do:
            continue
        rows = None if split == "full" else splits[split]["indices"]
        ytr = data.train.labels if rows is None else data.train.labels[rows]
        n = len(ytr)
        if "knn" in do:
            t = time.perf_counter()
            bank = ftr if rows is None else np.asarray(ftr[rows])
            # the full table keeps every k; low-shot subsets keep k=20 (SEER's) or the nearest given k
            counts = np.bincount(ytr)
            ks = knn_ks(opts.ks, n, split, report if model == "this" else None, int(counts[counts > 0].min()))
            for r in knn_eval(bank, ytr, fte, data.test.labels, data.n_classes, ks, opts.temperature,
                              run.device) if ks else []:
                report.add(model, "knn", split, r.pop("top1"), r.pop("top5"), n_train=n, n_test=len(data.test),
                           **common, **r)
            report.time("knn", time.perf_counter() - t)
        if "linear" in do:
            r = dict(linear[split])
            report.add(model, "linear", split, r.pop("top1"), r.pop("top5"), n_train=n, n_test=len(data.test),
                       **common, **r)
        run.say(f"{model} {split}: " + ", ".join(
            f"{x['protocol']}{'@' + str(x['k']) if 'k' in x else ''} {x['top1']:.1f}"
            for x in report.results if x["model"] == model and x["split"] == split))


def knn_ks(ks: tuple[int, ...], n: int, split: str, report: Report | None = None,
           smallest: int = 0) -> tuple[int, ...]:
    """The k that tell something on ``n`` labelled images: a k >= n lets every image vote, so every such
    k gives the same answer; those are skipped (``report.skip`` says so once, for the evaluated model).
    Low-shot subsets keep one k: 20 (SEER's) or the nearest given k below n. On all labels, a k above
    the ``smallest`` class's count is kept with a note (its votes lean towards the larger classes)."""
    fit = tuple(k for k in ks if k < n)
    if split != "full":
        fit = (min(fit, key=lambda k: abs(k - 20)),) if fit else ()
    if report is not None:
        where = "all labels" if split == "full" else f"the {split} split"
        too_big = [k for k in ks if k >= n]
        if too_big and (split == "full" or not fit):
            report.skip(f"kNN k={','.join(map(str, too_big))} on {where}",
                        f"k >= the {n} labelled images: every image votes, so each such k gives the same answer"
                        + ("" if fit else "; pass a smaller --k"))
        over = [k for k in fit if k > smallest] if split == "full" and smallest else []
        if over:
            report.notes.append(f"kNN k={','.join(map(str, over))} is more than the {smallest} labelled images of "
                                f"the smallest class: its votes lean towards the larger classes")
    return fit
