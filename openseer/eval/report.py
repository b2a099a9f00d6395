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

MODELS = {
    "this": "this model",
    "random_init": "random init*",
    "pixels": "raw pixels",
    "scratch": "supervised from scratch",
}
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
        self.t0 = time.perf_counter()

    def add(self, model: str, protocol: str, split: str, top1: float, top5: float, **params) -> dict:
        row = {"model": model, "protocol": protocol, "split": split, "top1": round(float(top1), 3),
               "top5": round(float(top5), 3), **params}
        self.results.append(row)
        return row

    def time(self, stage: str, seconds: float) -> None:
        self.timings[stage] = round(self.timings.get(stage, 0.0) + seconds, 2)

    def to_dict(self) -> dict:
        return {**self.header, "notes": self.notes, "results": self.results,
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
    """'full' -> '100%', '1pct' -> '1%', '5perclass' -> '5/class'."""
    if split == "full":
        return "100%"
    if split.endswith("pct"):
        return split[:-3] + "%"
    if split.endswith("perclass"):
        return split[:-8] + "/class"
    return split


def _row_name(r: dict) -> str:
    if r["protocol"] == "knn":
        return f"kNN k={r['k']}"
    return {"linear": "linear probe", "finetune": "fine-tune"}.get(r["protocol"], r["protocol"])


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
            cells.append(f"{hit[0]['top1']:.1f}" if hit else "")
        lines.append(f"| {name} | {split_label(split)} | " + " | ".join(cells) + " |")
    caption = "Top-1 accuracy (%) on the test split; top-5 and every setting are in the JSON."
    if any(r["protocol"] == "finetune" for r in results):
        caption += (" Fine-tune: the whole backbone plus a new head on the labelled subset; the 'supervised from "
                    "scratch' column trains the same architecture from random weights with the same budget.")
    lines += ["", caption]
    if "random_init" in models or w.get("random_init"):
        lines.append(RANDOM_INIT_NOTE)
    lines += [f"- {n}" for n in doc.get("notes", [])]
    t = doc.get("timings_s", {})
    if t:
        lines.append("- time (s): " + ", ".join(f"{k} {v:g}" for k, v in t.items()))
    return "\n".join(lines)
