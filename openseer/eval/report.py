"""The evaluation report: every number with its protocol in eval.json, and a markdown table.

Each result is one flat record (model, protocol, split, top-1, top-5, and the settings that
produced it: k, T, epochs, seed, feature layer, weights hash), so reports from different runs can
be concatenated and compared row by row.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..fileio import atomic_write_text
from .fewlabels import wilson

MODELS = {
    "this": "this model",
    "random_init": "random init*",
    "pixels": "raw pixels",
    "scratch": "supervised from scratch",
}
SMALL_TEST = 1000  # test splits under this many images show each accuracy's 95% interval in the table
RANDOM_INIT_NOTE = ("* random init: the same architecture with fresh weights, built with zero_init_last=False "
                    "(timm zero-initialises the last norm of each residual block by default, which makes random "
                    "features nearly constant); this is the floor")


class Report:
    """Collects results and metadata; ``write`` saves eval.json and eval.md side by side."""

    def __init__(self, header: dict):
        self.header = dict(header)
        self.results: list[dict] = []
        self.timings: dict[str, float] = {}
        self.notes: list[str] = []
        self.skipped: list[dict] = []  # what was not run, and why (a k beyond the labels, a split too small)
        self.chance: float | None = None  # top-1 % of always guessing the test split's most common class
        self.t0 = time.perf_counter()

    def add(self, model: str, protocol: str, split: str, top1: float, top5: float, **params) -> dict:
        """One result; with ``n_test``, its Wilson 95% interval (``top1_ci95``) and, when it is no
        better than guessing the most common test class, ``at_or_below_chance``."""
        row = {"model": model, "protocol": protocol, "split": split, "top1": round(float(top1), 3),
               "top5": round(float(top5), 3), **params}
        n = params.get("n_test")
        if n:
            lo, hi = wilson(round(float(top1) * n / 100), n)
            row["top1_ci95"] = [round(lo, 2), round(hi, 2)]
        if self.chance is not None:
            row["chance_top1"] = round(self.chance, 3)
            row["at_or_below_chance"] = bool(float(top1) <= self.chance + 1e-9)
        self.results.append(row)
        return row

    def skip(self, what: str, reason: str) -> None:
        """A protocol or split not run, with the reason (eval.json's ``skipped``, the table's notes)."""
        self.skipped.append({"what": what, "reason": reason})

    def time(self, stage: str, seconds: float) -> None:
        self.timings[stage] = round(self.timings.get(stage, 0.0) + seconds, 2)

    def to_dict(self) -> dict:
        return {**self.header, "notes": self.notes, "skipped": self.skipped, "results": self.results,
                "timings_s": {**self.timings, "total": round(time.perf_counter() - self.t0, 2)}}

    def find(self, model: str, protocol: str, split: str, k: int | None = None) -> dict | None:
        for r in self.results:
            if (r["model"], r["protocol"], r["split"]) == (model, protocol, split) and (k is None or r.get("k") == k):
                return r
        return None

    def markdown(self) -> str:
        return render_markdown(self.to_dict())

    def write(self, path: Path) -> dict:
        """Write ``path`` (JSON) and the markdown beside it (same name, .md), atomically; returns the
        document written, with ``written`` naming both files."""
        path.parent.mkdir(parents=True, exist_ok=True)
        md_path = path.with_suffix(".md")
        doc = self.to_dict()
        for target, text in ((path, json.dumps(doc, indent=1)), (md_path, render_markdown(doc))):
            atomic_write_text(target, text + "\n")
        return {**doc, "written": {"json": str(path), "markdown": str(md_path)}}


def split_label(split: str) -> str:
    """'full' -> '100%', '1pct' -> '1%', '5perclass' -> '5/class', 'select100' -> '100 chosen by select',
    'random100' -> '100 random'."""
    if split == "full":
        return "100%"
    if split.endswith("pct"):
        return split[:-3] + "%"
    if split.endswith("perclass"):
        return split[:-8] + "/class"
    if split.startswith("select") and split[6:].isdigit():
        return f"{split[6:]} chosen by select"
    if split.startswith("random") and split[6:].isdigit():
        return f"{split[6:]} random"
    return split


ROW_NAMES = {"linear": "linear probe", "finetune": "fine-tune", "fewlabels": "finetune's choice"}


def row_name(r: dict) -> str:
    """A result's protocol as a table row names it ('kNN k=20', 'linear probe', ...)."""
    if r["protocol"] == "knn":
        return f"kNN k={r.get('k')}"
    return ROW_NAMES.get(r["protocol"], r["protocol"])


_row_name = row_name


def cell(r: dict, n_test: int | None = None) -> str:
    """A table cell: top-1, its 95% interval when the test split is small, '<=chance' when it is no
    better than guessing the most common class."""
    text = f"{r['top1']:.1f}"
    if r.get("top1_std") is not None:
        text += f" ±{r['top1_std']:.1f}"
    ci = r.get("top1_ci95")
    if ci and (n_test if n_test is not None else r.get("n_test", SMALL_TEST)) < SMALL_TEST:
        text += f" [{ci[0]:.0f}-{ci[1]:.0f}]"
    if r.get("at_or_below_chance"):
        text += " <=chance"
    return text


def small_set_notes(doc: dict) -> list[str]:
    """What the table cannot tell: a small test split's intervals, rows no better than chance, what was
    skipped and why (shared by eval.md, the report page and the demo's summary)."""
    d = doc.get("data", {})
    results = doc.get("results", [])
    out = []
    n_test = d.get("n_test")
    if isinstance(n_test, int) and 0 < n_test < SMALL_TEST:
        lo, hi = wilson(n_test // 2, n_test)
        out.append(f"the test split holds {n_test} images: an accuracy near 50% is known only to within "
                   f"{lo:.0f}-{hi:.0f}% (Wilson 95% intervals in brackets); label more test images for a tighter one")
    low = [r for r in results if r.get("at_or_below_chance")]
    if low:
        out.append(f"<=chance: {len(low)} result(s) at or below the {low[0]['chance_top1']:.1f}% that always "
                   f"guessing the most common test class gets: they show nothing learned")
    out += [f"skipped {s['what']}: {s['reason']}" for s in doc.get("skipped", [])]
    return out


def render_markdown(doc: dict) -> str:
    """A table: one row per (protocol, labelled split), one column per model; top-1 % on the test split."""
    results = doc["results"]
    models = [m for m in MODELS if any(r["model"] == m for r in results)]
    w = doc.get("weights", {})
    d = doc.get("data", {})
    step = f", step {w['step']}" if "step" in w else ""
    lines = [
        f"## openseer eval: {w.get('source', '?')}",
        "",
        f"- weights: {w.get('arch')} ({w.get('init')}{step}), hash {w.get('weights_hash')}",
        f"- data: {d.get('name')} ({d.get('split')}): {d.get('n_train')} train, {d.get('n_test')} test, "
        f"{d.get('n_classes')} classes",
        f"- transform: crop {doc.get('transform', {}).get('crop')} ({w.get('transform_from')}); "
        f"features: {doc.get('feature_layer', 'pooled')}; seed {doc.get('seed')}",
        "",
        "| protocol | labels | " + " | ".join(MODELS[m] for m in models) + " |",
        "|---|---|" + "---|" * len(models),
    ]
    rows: list[tuple[str, str]] = []
    for r in results:
        if (_row_name(r), r["split"]) not in rows:
            rows.append((_row_name(r), r["split"]))
    for name, split in rows:
        cells = []
        for m in models:
            hit = [r for r in results if r["model"] == m and r["split"] == split and _row_name(r) == name]
            cells.append(cell(hit[0]) if hit else "")
        lines.append(f"| {name} | {split_label(split)} | " + " | ".join(cells) + " |")
    caption = "Top-1 accuracy (%) on the test split; top-5 and every setting are in the JSON."
    if any(r["protocol"] == "finetune" for r in results):
        caption += (" Fine-tune: the whole backbone plus a new head on the labelled subset; the 'supervised from "
                    "scratch' column trains the same architecture from random weights with the same budget.")
    budget = [r for r in results if r["protocol"] == "fewlabels"]
    if budget:
        n = budget[0]["n_train"]
        caption += (f" Finetune's choice: {n} labels, chosen by `openseer select`'s rule or at random (mean ± spread "
                    f"over {max(r.get('draws', 1) for r in budget)} draws), fitted with the protocol `openseer "
                    f"finetune` picks by cross-validation on those labels alone (kNN or a linear head).")
    lines += ["", caption]
    if "random_init" in models or w.get("random_init"):
        lines.append(RANDOM_INIT_NOTE)
    lines += [f"- {n}" for n in [*doc.get("notes", []), *small_set_notes(doc)]]
    t = doc.get("timings_s", {})
    if t:
        lines.append("- time (s): " + ", ".join(f"{k} {v:g}" for k, v in t.items()))
    return "\n".join(lines)
