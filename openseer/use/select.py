"""``openseer select``: which images of a pile to label first, for a labelling budget of N.

Typical and diverse picks on the model's embeddings (TypiClust, Hacohen et al. 2022): the candidates
(one member per near-duplicate group, bad files never: both as ``curate`` finds them) are clustered
by spherical k-means into as many clusters as there will be labelled images (already labelled + N);
the N largest clusters that hold no labelled image each give their most *typical* member, the one
with the smallest mean distance to its nearest neighbours in the cluster. Typical images are easy to
label and stand for many others; one per cluster spreads the budget over the pile. When fewer
clusters than picks remain, the budget is shared evenly over the clusters (``curate``'s water-fill),
the most typical members first. Near-copies never compete: only one member of each group is a
candidate, and none of a group that holds a labelled image.

With ``--labelled`` (a CSV of path,label or a folder of class folders) the already-labelled images
cover their clusters, so the next N extend the set away from what it covers.

Outputs in ``--out``: ``to_label.csv`` (``path,label`` with the label column empty for a person to
fill, then why each was chosen: cluster, its size, typicality, order), ``to_label.html`` (a
self-contained contact sheet to label from), ``select.json`` (settings, counts, bad files by reason)
and ``embed/`` (the embeddings, resumable, reused on a second run).
"""

from __future__ import annotations

import csv
import html
import time
from pathlib import Path

import numpy as np

from ..data.decode import DataError
from ..eval.fewlabels import wilson
from ..eval.typical import NEIGHBOURS, REDO, Pick, choose, typicality  # noqa: F401 (the maths, in eval/ for eval's rows)
from ..fileio import atomic_write_json, atomic_write_text, csv_text
from .curate import DUP_THRESHOLD, _thumb, group_representatives, pile_duplicate_groups, pile_quality

FORMAT = "openseer.select.v1"


class SelectError(DataError):
    """A selection that cannot run as asked: what, and how to fix it."""


# ---------------------------------------------------------------- the job


def _labelled_paths(spec: str) -> list[str]:
    """The image paths (or pile keys) of an already-labelled set: a CSV of path,label (relative paths
    against the CSV's folder) or a folder of class folders."""
    from ..data.collection import list_folder

    path = Path(spec).expanduser()
    if path.is_dir():
        return [str((path / n).resolve()) for n in list_folder(path)]
    if not path.is_file():
        raise SelectError(f"--labelled {spec!r} does not exist: give a CSV of path,label or a folder of class folders")
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = [r for r in csv.reader(f) if r and r[0].strip()]
    if rows and rows[0][0].strip().lower() in ("path", "file", "filename", "image"):
        rows = rows[1:]
    out = []
    for r in rows:
        if len(r) < 2 or not r[1].strip():
            continue  # not labelled yet (e.g. a to_label.csv half filled): not covered
        p = Path(r[0].strip()).expanduser()
        p = p if p.is_absolute() else path.parent / p
        out.append(str(p.resolve()) if p.exists() else r[0].strip())
    return out


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SelectError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "select.json").is_file() and not (out / "embed").is_dir():
        raise SelectError(f"--out {out} is not empty and holds no openseer selection; choose another folder")


def select(pile: str, out: str | Path, model_spec: str, budget: int, labelled: str = "",
           dup_by: str = "descriptor", dup_threshold: float = DUP_THRESHOLD, seed: int = 0, batch_size: int = 64,
           workers: int = 0, device: str = "cpu", layer: str = "last", progress: bool = True, log=print) -> dict:
    """Choose ``budget`` images of ``pile`` to label (see the module docstring); returns ``select.json``."""
    from ..data.collection import open_collection
    from .api import load
    from .embed import embed_pile, reason_counts

    t0 = time.perf_counter()
    out = Path(out).expanduser()
    if budget < 1:
        raise SelectError(f"--budget must be >= 1 (images to label); got {budget}")
    if dup_by not in ("embedding", "descriptor", "none"):
        raise SelectError(f"--dup-by must be 'descriptor', 'embedding' or 'none'; got {dup_by!r}")
    _check_out(out)
    coll = open_collection(pile)
    if coll.n == 0:
        raise SelectError(f"the pile {pile} holds no images")
    known = _labelled_paths(labelled) if labelled else []
    model = load(model_spec, device=device, layer=layer)
    log(f"openseer select: {budget} images to label from {coll.description} with {model.arch} "
        f"({model.feature_dim}-d)" + (f", {len(known)} already labelled" if labelled else ""))
    x, rows, bad = embed_pile(model, pile, out / "embed", batch_size=batch_size, workers=workers, progress=progress)
    if len(x) == 0:
        raise SelectError(f"no image of {pile} could be decoded ({len(bad)} bad): see {out / 'embed' / 'bad.csv'}")

    groups = pile_duplicate_groups(pile, x, rows, dup_by, dup_threshold, progress)
    candidates = group_representatives(x, groups, pile_quality(pile, rows))  # the best copy: largest, least compressed
    distinct = int(candidates.sum())  # one per near-copy group
    lab_x = np.zeros((0, x.shape[1]), np.float32)
    in_pile = 0
    if known:
        where = {}
        for i, r in enumerate(rows):
            where[r["key"]] = i
            where[str(Path(r["path"]).resolve()) if r["path"] and "#" not in r["path"] else r["path"]] = i
        hit = [where[k] for k in known if k in where]
        in_pile = len(hit)
        outside = [k for k in known if k not in where and Path(k).is_file()]
        parts = [x[hit]]
        if outside:  # labelled images that are not in the pile: embedded on their own
            atomic_write_text(out / "labelled.txt", "".join(f"{p}\n" for p in outside))
            parts.append(embed_pile(model, str(out / "labelled.txt"), out / "labelled", batch_size=batch_size,
                                    workers=workers, progress=progress)[0])
        lab_x = np.concatenate(parts)
        candidates &= ~np.isin(groups, groups[hit])  # labelled images and their near-copies
    picks = choose(x, budget, candidates, lab_x, seed=seed)

    header = ["path", "label", "key", "cluster", "cluster_size", "typicality", "order"]
    table = [[rows[p.row]["path"] or rows[p.row]["key"], "", rows[p.row]["key"], p.cluster, p.cluster_size,
              f"{p.typicality:.4f}", i + 1] for i, p in enumerate(picks)]
    atomic_write_text(out / "to_label.csv", csv_text(table, header))
    reasons = reason_counts(b["reason"] for b in bad)
    summary = {
        "format": FORMAT, "pile": coll.description, "pile_spec": pile, "model": model_spec, "arch": model.arch,
        "feature_dim": model.feature_dim, "layer": model.layer, "budget": budget, "chosen": len(picks),
        "inputs": coll.n, "decoded": len(x), "bad": len(bad), "bad_by_reason": reasons,
        "candidates": int(candidates.sum()), "duplicates_left_out": len(x) - distinct,
        "dup_by": dup_by, "dup_threshold": dup_threshold, "labelled": labelled or None,
        "labelled_images": len(known), "labelled_in_pile": in_pile, "clusters": len(lab_x) + budget,
        "method": "typical member of each of the largest uncovered k-means clusters (TypiClust)",
        "neighbours": NEIGHBOURS, "seed": seed, "seconds": round(time.perf_counter() - t0, 1),
        "files": {n: str(out / n) for n in ("to_label.csv", "to_label.html")},
    }
    notes = []
    if len(picks) < budget:
        notes.append(f"{len(picks)} images chosen, fewer than the {budget} asked: that is every distinct "
                     f"image left after near-copies and already-labelled images")
    summary["what_it_tells"] = what_labels_tell(len(picks) + len(known))
    notes += summary["what_it_tells"]
    if notes:
        summary["note"] = " ".join(notes)
    write_sheet(out / "to_label.html", summary, picks, rows, coll)
    atomic_write_json(out / "select.json", summary)
    return summary


def what_labels_tell(n: int) -> list[str]:
    """What ``n`` labelled images can and cannot tell, in a person's words (the note ``select`` prints)."""
    if n <= 0:
        return []
    lo, hi = wilson(round(0.8 * n), n)
    out = [f"{n} labels measure a classifier only roughly: an 80% accuracy estimated on them (by "
           f"`openseer finetune`'s cross-validation) is known to within {lo:.0f}-{hi:.0f}% (95%)."]
    if n < 50:
        out.append("Picks are spread over clusters of the pile, not over classes (select never sees a class): "
                   "with this few, a rare class may get no label at all; add --budget or label a few by hand.")
    return out


def write_sheet(path: Path, summary: dict, picks: list[Pick], rows: list[dict], coll, side: int = 128) -> None:
    """A self-contained contact sheet: each chosen image with its number and path, in order."""
    e = html.escape
    cells = []
    for i, p in enumerate(picks):
        r = rows[p.row]
        uri = _thumb(coll, r, side=side)
        img = f'<img src="{uri}" width="{side}" height="{side}" style="object-fit:contain">' if uri else "[no preview]"
        cells.append(f'<figure>{img}<figcaption><b>{i + 1}</b> {e(r["path"] or r["key"])}<br>'
                     f'cluster {p.cluster} ({p.cluster_size} images)</figcaption></figure>')
    note = e(summary.get("note", ""))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>openseer: images to label</title>
<style>body{{font-family:sans-serif;margin:2em}}figure{{display:inline-block;width:{side + 24}px;margin:6px;
vertical-align:top;font-size:11px;word-break:break-all}}img{{background:#eee;image-rendering:auto}}</style>
</head><body><h1>{summary['chosen']} images to label</h1>
<p>From {e(summary['pile'])} ({summary['decoded']} images, {summary['bad']} bad), chosen with
{e(summary['model'])}: the most typical image of each of the largest groups of similar images, one per
group, so that a few labels cover the pile. {note}</p>
<p>Label them by writing each image's class into the <code>label</code> column of
<code>to_label.csv</code> (it lists them in this order), or by copying the files into one folder per class.
That labelled set is what <code>openseer eval MODEL --data LABELLED</code> reads; <code>openseer select
... --labelled LABELLED</code> then picks the next images away from what it covers.</p>
{''.join(cells)}
</body></html>
"""
    atomic_write_text(path, page)

