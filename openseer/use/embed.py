"""``openseer embed``: embeddings of a whole collection, written in resumable chunks.

Input (``--data``): a folder of images (recursive, sorted), a text file listing image paths (one a
line; relative paths are relative to the list's folder), tar shards (anything ``--data`` accepts
for pretraining: ``shards/{000000..000099}.tar``, a glob, a folder from ``openseer shard``; the
deny-list beside them is honoured), or ``fashion-mnist``.

Output folder::

    embeddings.npy   (N, D) float16 or float32, row i = image i of index.csv (np.load(..., mmap_mode='r'))
    index.csv        row,key,path     (key: path relative to the folder / the line as listed / shard sample key)
    bad.csv          key,path,reason  (images skipped: undecodable, missing, deny-listed)
    meta.json        model, transform, dtype, counts, timings

While it runs, rows are written straight into ``embeddings.partial.npy`` (a memory-mapped array
with one row per input) chunk by chunk; after each chunk the array is flushed and the chunk's
index and bad rows are written to ``parts/`` under their final name. Running the same command
again after an interruption skips the chunks already there. At the end the good rows are packed
into ``embeddings.npy`` (a rename when no image was bad) and ``parts/`` is removed.

Under ``torchrun --nproc_per_node N`` (and across machines, with ``--out`` on a shared file system)
the ranks split the chunks left to do and rank 0 packs the result (``openseer.use.ranks``): the same
files as one process, whatever the number of ranks, and a crashed rank's chunks are redone by the next
run.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..data.collection import Chunk, Collection, open_collection
from ..data.decode import DataError
from ..eval.common import draft_size
from ..eval.layers import describe_layer
from ..fileio import atomic_write_json, atomic_write_text, csv_text, read_csv_rows

PARTIAL = "embeddings.partial.npy"
PROGRESS = "progress.json"
FINAL = "embeddings.npy"
DTYPES = {"float16": np.float16, "float32": np.float32}


class EmbedError(DataError):
    """An embedding job that cannot run as asked (what and how to fix it)."""


# ---------------------------------------------------------------- the job


def _csv(rows: list[list], header: list[str]) -> str:
    return csv_text(rows, header)


def _read_csv(path: Path) -> list[list[str]]:
    return read_csv_rows(path)[1:]


def _read_progress(path: Path) -> dict | None:
    try:
        old = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None
    return old if isinstance(old, dict) else None


def embed_collection(model, data: str, out: str | Path, dtype: str = "float16", batch_size: int = 64,
                     chunk_size: int = 4096, workers: int = 0, limit: int = 0, normalize: bool = False,
                     overwrite: bool = False, progress: bool = True, max_chunks: int = 0) -> dict:
    """Embed every image of ``data`` with ``model`` (an ``openseer.Model``) into ``out``; resumable.

    Under torchrun the ranks share the chunks left to do and rank 0 finishes (``openseer.use.ranks``);
    every rank returns the same meta. ``max_chunks`` stops each rank after that many new chunks (to
    test resuming). Returns meta.json's content.
    """
    from ..progress import progress as progress_bar
    from .ranks import open_ranks, rank_device

    if dtype not in DTYPES:
        raise EmbedError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if batch_size < 1 or chunk_size < 1:
        raise EmbedError("--batch-size and --chunk-size must be >= 1")
    ranks = open_ranks(model.device)
    if rank_device(model.device, ranks) != model.device:
        model.to(rank_device(model.device, ranks))  # each rank on its own GPU
    out = Path(out).expanduser()
    coll = open_collection(data, limit=limit, chunk_size=chunk_size, channels=1 if len(model.transform.mean) == 1 else 3)
    dim = model.feature_dim
    params = {"format": "openseer.embeddings.v1", "data": str(data), "data_fingerprint": coll.fingerprint(),
              "n": coll.n, "chunks": len(coll.chunks), "chunk_size": chunk_size if coll.kind != "shards" else None,
              "dtype": dtype, "dim": dim, "normalize": normalize, "weights_hash": model.info["weights_hash"],
              "transform": model.transform.ident(), "layer": model.layer}
    seen = ranks.gather((params["data_fingerprint"], coll.n))
    if len(set(seen)) > 1:
        raise EmbedError(f"the ranks see different collections at {data} ({seen}): every rank must read the "
                         f"same files (on several machines: the same paths on a shared file system)")
    np_dtype = DTYPES[dtype]
    t0 = time.perf_counter()
    state = ranks.on_main(_prepare, out, params, overwrite, coll, np_dtype)
    if state["complete"]:
        return state["meta"]
    done = set(state["done"])
    mine = ranks.mine([c for c in coll.chunks if c.index not in done])
    if max_chunks:
        mine = mine[:max_chunks]
    partial, parts = out / PARTIAL, out / "parts"
    rows_out = _RowWriter(partial, dim, np_dtype)
    if ranks.world == 1:  # the whole job, the chunks already done counted in
        bar = progress_bar("embed", total=coll.n, unit="img", enabled=progress,
                           initial=sum(c.stop - c.start for c in coll.chunks if c.index in done))
    else:  # rank 0's share
        bar = progress_bar(f"embed (rank 0 of {ranks.world})", total=sum(c.stop - c.start for c in mine),
                           unit="img", enabled=progress and ranks.is_main)
    n_new, finished = 0, []
    try:
        for chunk in mine:
            good, bad = _embed_chunk(model, coll, chunk, rows_out, batch_size, workers, normalize, bar)
            rows_out.sync()
            atomic_write_text(parts / f"{chunk.index:06d}.bad.csv", _csv(bad, ["row", "key", "path", "reason"]))
            atomic_write_text(parts / f"{chunk.index:06d}.csv", _csv(good, ["row", "key", "path"]))  # marks it done
            n_new += chunk.stop - chunk.start
            finished.append(chunk.index)
    finally:
        rows_out.close()
        bar.close()
    everyone = ranks.gather((n_new, finished))
    seconds = time.perf_counter() - t0
    n_new = sum(n for n, _ in everyone)
    done_now = done.union(*(f for _, f in everyone))
    meta = {"format": "openseer.embeddings.v1", "complete": len(done_now) == len(coll.chunks),
            "data": coll.description, "n_inputs": coll.n, "dim": dim, "dtype": dtype, "normalized": normalize,
            "feature_layer": describe_layer(model.stages),
            "model": {k: v for k, v in model.info.items() if k != "config"},
            "transform": model.transform.describe(), "chunks": len(coll.chunks), "chunks_skipped": len(done),
            "ranks": ranks.world, "images_this_run": n_new, "seconds_this_run": round(seconds, 2),
            "images_per_s": round(n_new / seconds, 1) if seconds > 0 and n_new else None}
    if not meta["complete"]:
        meta["resume"] = "run the same command again to continue"
        return meta
    return ranks.on_main(_finish_job, out, coll, dim, np_dtype, meta, params)


def _prepare(out: Path, params: dict, overwrite: bool, coll: Collection, np_dtype) -> dict:
    """Rank 0: check or make the output folder and the partial array; which chunks are done."""
    progress_path, partial, parts = out / PROGRESS, out / PARTIAL, out / "parts"
    if out.exists() and any(out.iterdir()):
        old = _read_progress(progress_path)
        if overwrite:
            if old is None and not (out / FINAL).is_file():
                raise EmbedError(f"{out} is not an openseer embedding folder: refusing to delete it for --overwrite")
            shutil.rmtree(out)
        elif old is None:
            raise EmbedError(f"{out} exists and is not an openseer embedding folder; choose another --out or "
                             f"pass --overwrite")
        else:
            # a finished job does not depend on how it was chunked
            ignore = ("chunks", "chunk_size") if old.get("complete") else ()
            diff = [k for k in params if k not in ignore and old.get("params", {}).get(k) != params[k]]
            if diff:
                raise EmbedError(f"{out} holds embeddings made with other settings ({', '.join(diff)} differ); "
                                 f"pass --overwrite to start again, or another --out")
            if old.get("complete"):
                meta = json.loads((out / "meta.json").read_text())
                meta["resumed"] = "already complete"
                return {"complete": True, "meta": meta}
    out.mkdir(parents=True, exist_ok=True)
    parts.mkdir(exist_ok=True)
    if not progress_path.is_file():
        atomic_write_json(progress_path, {"params": params, "complete": False})
    shape = (coll.n, params["dim"])
    if partial.is_file():
        arr = np.load(partial, mmap_mode="r")
        if arr.shape != shape or arr.dtype != np_dtype:
            raise EmbedError(f"{partial} has shape {arr.shape} {arr.dtype}, expected {shape} {params['dtype']}; "
                             f"pass --overwrite")
    else:  # the rows of any chunk marked done are lost with the array: those chunks are redone
        for f in parts.iterdir():
            f.unlink()
        arr = np.lib.format.open_memmap(partial, mode="w+", dtype=np_dtype, shape=shape)
        arr.flush()
    del arr
    return {"complete": False, "done": [c.index for c in coll.chunks if (parts / f"{c.index:06d}.csv").is_file()]}


class _RowWriter:
    """Rows written into the partial ``.npy`` at their place, with plain positioned writes: ranks on
    several machines may share the file (each writes only its own rows' bytes, which a memory map
    on a network file system does not promise)."""

    def __init__(self, path: Path, dim: int, np_dtype):
        head = np.load(path, mmap_mode="r")
        self.offset, self.row_bytes, self.dtype = int(head.offset), dim * np.dtype(np_dtype).itemsize, np_dtype
        del head
        self.fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))

    def write(self, rows: list[int], values: np.ndarray) -> None:
        """Row ``rows[i]`` := ``values[i]``; runs of consecutive rows in one write each."""
        values = np.ascontiguousarray(values, dtype=self.dtype)
        i = 0
        while i < len(rows):
            j = i + 1
            while j < len(rows) and rows[j] == rows[j - 1] + 1:
                j += 1
            data = values[i:j].tobytes()
            pos, at = self.offset + rows[i] * self.row_bytes, 0
            while at < len(data):
                at += os.pwrite(self.fd, data[at:], pos + at)
            i = j

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def _embed_chunk(model, coll: Collection, chunk: Chunk, rows_out: _RowWriter, batch_size: int, workers: int,
                 normalize: bool, bar) -> tuple[list, list]:
    t = model.transform
    good: list[list] = []
    bad: list[list] = []
    rows: list[int] = []
    batch: list[torch.Tensor] = []

    def flush() -> None:
        if not batch:
            return
        x = t.normalize(torch.cat(batch))
        f = model.forward(x)
        if normalize:
            f /= np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        rows_out.write(rows, f)
        bar.update(len(rows))
        batch.clear()
        rows.clear()

    for row, key, path, item in coll.read_chunk(chunk, draft_size(t.crop), workers):
        if isinstance(item, str):
            bad.append([row, key, path, item])
            bar.update(1)
            continue
        batch.append(t.geometry(item.unsqueeze(0) * 255 if item.is_floating_point() else item.unsqueeze(0)))
        rows.append(row)
        good.append([row, key, path])
        if len(batch) >= batch_size:
            flush()
    flush()
    return good, bad


def _finish_job(out: Path, coll: Collection, dim: int, np_dtype, meta: dict, params: dict) -> dict:
    """Rank 0, once every chunk is done: pack the result, write meta.json, mark the job complete."""
    meta.update(_finish(out, coll, dim, np_dtype))
    atomic_write_json(out / "meta.json", meta)
    atomic_write_json(out / PROGRESS, {"params": params, "complete": True})
    return meta


def _part(path: Path, wait_s: float = 120.0) -> list[list[str]]:
    """A chunk's part file, which another rank reported written: on a network file system this
    machine may see it a little later, so wait for it (a while) before calling it missing."""
    end = time.monotonic() + wait_s
    while not path.is_file():
        if time.monotonic() > end:
            raise EmbedError(f"{path} was reported written by another rank but is not there: --out must be on "
                             f"a file system every machine shares")
        time.sleep(0.5)
    return _read_csv(path)


def _finish(out: Path, coll: Collection, dim: int, np_dtype) -> dict:
    """Pack the good rows into embeddings.npy, write index.csv and bad.csv, remove the parts."""
    parts = out / "parts"
    good: list[list[str]] = []
    bad: list[list[str]] = []
    for c in coll.chunks:
        good += _part(parts / f"{c.index:06d}.csv")
        bad += _part(parts / f"{c.index:06d}.bad.csv")
    good_rows = np.array([int(r[0]) for r in good], dtype=np.int64)
    partial = out / PARTIAL
    if len(good_rows) == coll.n:
        os.replace(partial, out / FINAL)
    else:
        src = np.load(partial, mmap_mode="r")
        tmp = out / f".{FINAL}.tmp.npy"
        dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=np_dtype, shape=(len(good_rows), dim))
        step = 65536
        for s in range(0, len(good_rows), step):
            dst[s:s + step] = src[good_rows[s:s + step]]
        dst.flush()
        del dst, src
        os.replace(tmp, out / FINAL)
        partial.unlink()
    atomic_write_text(out / "index.csv", _csv([[i, k, p] for i, (_, k, p) in enumerate(good)], ["row", "key", "path"]))
    atomic_write_text(out / "bad.csv", _csv([[k, p, r] for _, k, p, r in bad], ["key", "path", "reason"]))
    shutil.rmtree(parts, ignore_errors=True)
    if not good:
        reasons_n = reason_counts(r for *_, r in bad)
        raise EmbedError(f"no usable image in {coll.description}: all {len(bad)} were skipped "
                         f"({', '.join(f'{k} {v}' for k, v in sorted(reasons_n.items()))}); see {out / 'bad.csv'}")
    if bad:
        reasons = reason_counts(r for *_, r in bad)
        print(f"openseer: skipped {len(bad)} images ({', '.join(f'{k} {v}' for k, v in reasons.items())}); "
              f"listed in {out / 'bad.csv'}", file=sys.stderr)
    return {"n": int(len(good_rows)), "n_bad": len(bad),
            "files": {"embeddings": str(out / FINAL), "index": str(out / "index.csv"), "bad": str(out / "bad.csv")}}


def reason_counts(reasons) -> dict[str, int]:
    """How many skips of each kind: a reason's kind is the part before its first ':'."""
    return dict(Counter(str(r).split(":")[0] for r in reasons))


def embed_pile(model, data: str, folder: str | Path, normalize: bool = True, every_rank: bool = True,
               **options) -> tuple[np.ndarray, list[dict], list[dict]] | None:
    """Embed ``data`` into ``folder`` (resumable: ``embed_collection``) and read it back: (float32
    embeddings, index rows, bad rows with their reasons), for the commands that work on a whole pile
    (curate, select, finetune --pile, predict).

    Under torchrun the ranks share the embedding; afterwards every rank reads the result, or with
    ``every_rank=False`` rank 0 only (the others get None: a command whose rest is rank 0's work)."""
    folder = Path(folder)
    meta = model.embed_collection(data, folder, dtype="float32", normalize=normalize, **options)
    if not meta.get("complete", True):
        raise EmbedError(f"embedding {data} stopped early; run the same command again to continue")
    if not every_rank:
        from .ranks import open_ranks

        if not open_ranks(model.device).is_main:
            return None
    emb, rows = load_embeddings(folder)
    with open(folder / "bad.csv", newline="", encoding="utf-8") as f:
        bad = list(csv.DictReader(f))
    return np.asarray(emb, dtype=np.float32), rows, bad


def reuse_embeddings(folder: str | Path, model, data: str) -> tuple[np.ndarray, list[dict], list[dict]]:
    """A finished ``openseer embed`` folder of ``data`` made with ``model`` (same weights, transform,
    layer and listing), read back as ``embed_pile`` gives it (unit rows, float32): so curate need not
    embed the pile again. Anything else is refused, naming what differs."""
    folder = Path(folder).expanduser()
    old = _read_progress(folder / PROGRESS)
    if old is None or not (folder / FINAL).is_file():
        raise EmbedError(f"{folder} is not a finished `openseer embed` folder (no {PROGRESS} / {FINAL})")
    was = old.get("params", {})
    coll = open_collection(data, channels=1 if len(model.transform.mean) == 1 else 3)
    now = {"data_fingerprint": coll.fingerprint(), "n": coll.n, "weights_hash": model.info["weights_hash"],
           "transform": model.transform.ident(), "layer": model.layer}
    diff = [k for k in now if was.get(k) != now[k]]
    if diff:
        raise EmbedError(f"{folder} holds embeddings of other images or of another model ({', '.join(diff)} "
                         f"differ{'s' if len(diff) == 1 else ''}): embed {data} with this model, or leave "
                         f"--embeddings out")
    emb, rows = load_embeddings(folder)
    x = np.asarray(emb, dtype=np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    with open(folder / "bad.csv", newline="", encoding="utf-8") as f:
        bad = list(csv.DictReader(f))
    return x, rows, bad


def load_embeddings(folder: str | Path) -> tuple[np.ndarray, list[dict]]:
    """(memory-mapped embeddings, index rows as dicts) of a finished ``openseer embed`` folder."""
    folder = Path(folder)
    arr = np.load(folder / FINAL, mmap_mode="r")
    with open(folder / "index.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return arr, rows
