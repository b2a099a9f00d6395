"""``openseer predict``: a classifier's top classes for every image of a collection.

The images are embedded as ``openseer embed`` embeds them (any collection; resumable chunk by chunk in
``OUT.parts/``, which a second run after an interruption continues; bad files skipped and listed with
their reason), then the classifier's head turns each row into class probabilities. Output:
``OUT`` (a CSV: path, key, then ``top`` pairs of class and probability, best first) and, beside it,
``OUT`` with ``.bad.csv`` for the skipped files.

Under ``torchrun --nproc_per_node N`` the ranks share the embedding chunks (``openseer.use.ranks``, the
runner ``openseer embed`` uses) and rank 0 alone applies the head and writes the CSVs: the same
files as one process.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from ..fileio import atomic_write_text, csv_text
from ..model.checkpoint_file import CheckpointError

CHUNK_ROWS = 65536  # rows of probabilities computed at once


def predict(classifier: str, data: str, out: str | Path, top: int = 5, batch_size: int = 64, workers: int = 0,
            device: str = "cpu", progress: bool = True, chunk_size: int = 4096) -> dict:
    """Write ``out`` (see the module docstring); returns counts and file names (under torchrun, on
    rank 0; the other ranks get ``{"rank": r}``)."""
    from .api import load
    from .embed import embed_pile, reason_counts

    t0 = time.perf_counter()
    out = Path(out).expanduser()
    if out.suffix.lower() != ".csv":
        raise CheckpointError(f"--out {out}: predictions are written as a .csv file")
    model = load(classifier, device=device)
    t1 = time.perf_counter()  # images/s as embed counts them: the work after the model is loaded
    if not model.info.get("classifier"):
        raise CheckpointError(f"{classifier} is a backbone, not a classifier: make one with `openseer finetune`")
    classes = model.classes or []
    top = max(1, min(top, len(classes)))
    work = out.with_name(out.name + ".parts")
    pile = embed_pile(model, data, work, normalize=False, every_rank=False, batch_size=batch_size,
                      workers=workers, progress=progress, chunk_size=chunk_size)
    if pile is None:  # another rank's share is done; rank 0 writes the predictions
        from .ranks import open_ranks

        return {"rank": open_ranks(model.device).rank}
    emb, rows, bad = pile
    header = ["path", "key"] + [h for k in range(1, top + 1) for h in (f"class{k}", f"prob{k}")]
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:  # block by block into a hidden file, renamed whole: memory stays one block's, a reader sees all or nothing
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(csv_text([], header))
            for s in range(0, len(rows), CHUNK_ROWS):
                f.write(csv_text(_top_rows(model.probabilities(emb[s:s + CHUNK_ROWS]), rows[s:s + CHUNK_ROWS],
                                           classes, top)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    bad_out = out.with_name(out.stem + ".bad.csv")
    atomic_write_text(bad_out, csv_text([[b["path"], b["key"], b["reason"]] for b in bad], ["path", "key", "reason"]))
    reasons = reason_counts(b["reason"] for b in bad)
    shutil.rmtree(work, ignore_errors=True)
    now = time.perf_counter()
    return {"predicted": len(rows), "bad": len(bad), "bad_by_reason": reasons, "classes": classes,
            "files": {"predictions": str(out), "bad": str(bad_out)}, "seconds": round(now - t0, 1),
            "images_per_s": round(len(rows) / max(now - t1, 1e-9), 1)}


def _top_rows(p: np.ndarray, rows: list[dict], classes: list[str], top: int) -> list[list]:
    """CSV rows of one block: path, key, then the ``top`` best classes and their probabilities."""
    best = np.argsort(-p, axis=1, kind="stable")[:, :top]
    chosen = np.take_along_axis(p, best, axis=1)
    table = []
    for r, idx, probs in zip(rows, best.tolist(), chosen.tolist()):
        cells = [r["path"], r["key"]]
        for j, q in zip(idx, probs):
            cells += [classes[j], f"{q:.4f}"]
        table.append(cells)
    return table
