"""Shard writer: a folder or a file list of images -> tar shards, a manifest, an index; resumable.

``openseer shard SRC --out DIR [--shard-size N] [--max-side 512] [--sidecar meta.csv]`` writes::

    DIR/000000.tar ...   samples ``<key>.<ext>`` (the image) + ``<key>.json`` (key, sha256, sizes, format)
    DIR/manifest.csv     one row per stored image (columns below)
    DIR/skipped.csv      one row per input not stored: path, reason (a decode reason or 'duplicate'), detail
    DIR/index.json       per shard: name, samples, bytes, sha256; totals; the parameters
    DIR/progress.json    the resume point (kept; ``done`` once finished)

Shard size: ``--shard-size`` when given; otherwise ``auto_shard_size`` of the input count (even
shards, up to 8 of them, none under 256 images, none over 10,000), so a small pile still feeds
several loader slots (data/batches.py gives each slot whole shards).

Keys: ``key`` is the **content key**, the first 32 hex digits (128 bits) of the SHA-256 of the
original file bytes (the full digest is in ``sha256``). Exact duplicates (same SHA-256) are stored
once; later copies go to skipped.csv as 'duplicate' (the first path in input order wins).

Images: every input is decoded once to check it (bad ones are skipped with the reasons of
data/decode.py). With ``--max-side N`` an image whose longer side exceeds N is decoded (reduced
by DCT scaling when possible), EXIF-rotated, converted to RGB, resized with Lanczos so its longer
side is N, and re-encoded: PNG stays PNG, everything else becomes JPEG quality 95. Other images
are stored byte for byte. ``width``/``height`` are the original's displayed size (after EXIF
orientation); ``stored_*`` describe what is in the shard.

Depth is kept. A 16-bit greyscale PNG or TIFF is stored byte for byte, and when ``--max-side``
shrinks it, it is resized in float and written as a 16-bit PNG (never through 8 bits). A DICOM
file is stored as a 16-bit greyscale PNG of what the reader sees (data/decode.py: the modality
rescale, the window of ``data.dicom_window``/``$OPENSEER_DICOM_WINDOW`` mapped to 0..65535,
MONOCHROME1 inverted; colour DICOM as an 8-bit RGB PNG): every shard reader then reads it without
pydicom, at 16 bits, more than the 12 bits a CT or MR stores, and the window is fixed at sharding
time (shard with ``OPENSEER_DICOM_WINDOW=none`` to keep the whole stored range instead). Its
``format`` is ``DICOM``. A multi-frame file gives its middle frame, or with
``OPENSEER_DICOM_FRAMES=all`` one sample per frame, whose source is ``name.dcm#i`` and whose
content key is that of the file's bytes followed by ``#i`` (frames of one file are not duplicates
of each other); deny-listing ``name.dcm`` or the file's content key drops all its frames.

Manifest columns: key, sha256, shard, position, source, bytes, width, height, format,
stored_format, stored_bytes, stored_width, stored_height, then every column of the optional sidecar CSV (matched
on its ``path`` column, the input path as listed: relative to the folder, or as written in the file
list), e.g. source_url, licence.

The pile index (data/index.py) of each shard is written with it into ``DIR/.openseer-index/``
(near-copy descriptors of the stored bytes, described in the workers while the bytes are in hand:
``openseer index DIR`` then has nothing to do; ``--no-index`` leaves it to that command).

Safety: only fixed names are written, all inside ``--out`` (no input name ever becomes a path); a symlink in place of an output file is refused. Interrupted runs: completed shards and
their manifest rows are kept; the partial shard is rewritten. Re-running the same command resumes;
a different source, shard size or max side in the same ``--out`` is refused.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from ..fileio import atomic_write_json, name_to_text
from ..progress import progress as progress_bar
from .collection import open_collection
from .decode import (
    BadImage,
    DataError,
    dicom_pixels,
    exif_orientation,
    finish,
    is_dicom,
    open_bytes,
    parse_window,
    read_bytes,
)
from .denylist import KEY_HEX, DenyList

MANIFEST_COLUMNS = ["key", "sha256", "shard", "position", "source", "bytes", "width", "height", "format",
                    "stored_format", "stored_bytes", "stored_width", "stored_height"]
SKIPPED_COLUMNS = ["source", "reason", "detail"]
KEEP_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif", "GIF": "gif"}
PROGRESS = "progress.json"
AUTO_SHARDS = 8  # 2 loader workers x 2 ranks, twice over: every slot gets whole shards and passes end evenly
MIN_AUTO_SHARD = 256  # a floor: smaller shards only add files and opens, no more slots to feed
MAX_AUTO_SHARD = 10000  # a ceiling: a large pile is cut into shards of at most this many images
INDEX = "index.json"
MANIFEST = "manifest.csv"
SKIPPED = "skipped.csv"


def printable(name: str) -> str:
    """A path as one line of text that survives CSV/JSON and turns back into the name
    (``fileio.name_to_text``: backslash escapes for undecodable bytes, newlines and backslashes)."""
    return name_to_text(name)


def list_inputs(src: str | Path, read_timeout: float | None = None) -> tuple[Path, list[str]]:
    """(base folder, input paths as listed): a folder (recursive, sorted) or a file list, listed by
    data/collection.py (a file list written by ``fileio.write_list`` or one path per line)."""
    coll = open_collection(str(src), read_timeout=read_timeout, shards=False)
    return Path(coll.base or "."), [e.name for e in coll.entries]


@dataclass
class Prepared:
    """One input after reading, hashing, checking and (maybe) downscaling."""

    index: int
    source: str
    reason: str = ""
    detail: str = ""
    sha256: str = ""
    data: bytes = b""
    ext: str = ""
    row: dict | None = None
    file_sha256: str = ""  # the file's digest (``sha256`` differs for the frames of a DICOM file)
    described: tuple | None = None  # the pile index's row and descriptors of the stored bytes (``index``)


def _png16(grey: Image.Image) -> tuple[bytes, int, int]:
    """A PIL ``F`` image in [0, 1] as a 16-bit greyscale PNG (0..65535)."""
    arr = np.clip(np.asarray(grey, dtype=np.float32) * 65535.0 + 0.5, 0, 65535).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")  # mode I;16: PNG bit depth 16
    return buf.getvalue(), grey.width, grey.height


def _prepare_dicom(out: Prepared, data: bytes, max_side: int, window: str, frame: int) -> Prepared:
    """A DICOM frame as the reader sees it, stored as a 16-bit grey PNG (colour: 8-bit RGB PNG)."""
    arr = dicom_pixels(data, out.source, parse_window(window), frame if frame >= 0 else None)
    height, width = arr.shape[:2]
    if arr.ndim == 2:
        img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32), mode="F")
        if max_side and max(width, height) > max_side:
            img.thumbnail((max_side, max_side), Image.LANCZOS, reducing_gap=3.0)
            img = Image.fromarray(np.clip(np.asarray(img), 0, 1).astype(np.float32), mode="F")
        stored, sw, sh = _png16(img)
    else:
        img = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="RGB")
        if max_side and max(width, height) > max_side:
            img.thumbnail((max_side, max_side), Image.LANCZOS, reducing_gap=3.0)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        stored, sw, sh = buf.getvalue(), img.width, img.height
    out.data, out.ext = stored, "png"
    out.row = {"key": out.sha256[:KEY_HEX], "sha256": out.sha256, "source": out.source, "bytes": len(data),
               "width": width, "height": height, "format": "DICOM", "stored_format": "png",
               "stored_bytes": len(stored), "stored_width": sw, "stored_height": sh}
    return out


def prepare(index: int, base: str, name: str, max_side: int, read_timeout: float | None = None,
            frame: int = -1, dicom_window: str = "auto") -> Prepared:
    """Read (in bounded time), hash and check one input (runs in a worker process); never raises for bad files.

    ``frame`` >= 0: that frame of a multi-frame DICOM file (``data.dicom_frames=all``)."""
    out = Prepared(index, printable(name) + (f"#{frame}" if frame >= 0 else ""))
    path = Path(name) if os.path.isabs(name) else Path(base) / name
    try:
        data = read_bytes(path, read_timeout)
        out.file_sha256 = hashlib.sha256(data).hexdigest()
        digest = out.file_sha256 if frame < 0 else hashlib.sha256(data + f"#{frame}".encode()).hexdigest()
        out.sha256 = digest
        if is_dicom(data):
            return _prepare_dicom(out, data, max_side, dicom_window, frame)
        img = open_bytes(data, out.source)
        width, height = img.size
        fmt = img.format or "unknown"
        if max_side and max(width, height) > max_side:
            s = 1
            for cand in (8, 4, 2):
                if max(img.size) // cand >= max_side:
                    s = cand
                    break
            deep = img.mode.startswith("I;16") or img.mode in ("I", "F")  # 16-bit grey: resized in float
            rgb = finish(img, out.source, data, min_pixels=(img.width // s) * (img.height // s) if s > 1 else None,
                         channels=1 if deep else 3)
            rgb.thumbnail((max_side, max_side), Image.LANCZOS, reducing_gap=3.0)
            buf = io.BytesIO()
            if deep:  # kept at 16 bits: a 16-bit PNG
                buf.write(_png16(Image.fromarray(np.clip(np.asarray(rgb), 0, 1).astype(np.float32), mode="F"))[0])
                ext = "png"
            elif fmt == "PNG":
                rgb.save(buf, format="PNG", optimize=False)
                ext = "png"
            else:
                rgb.save(buf, format="JPEG", quality=95)
                ext = "jpg"
            stored, sw, sh = buf.getvalue(), rgb.width, rgb.height
        else:
            rgb = finish(img, out.source, data, min_pixels=1)  # full check; JPEGs at 1/8 scale (still every byte)
            if fmt in KEEP_FORMATS:
                stored, ext = data, KEEP_FORMATS[fmt]
                sw, sh = width, height
            elif img.mode.startswith("I;16") or img.mode in ("I", "F"):  # e.g. a 16-bit PGM: a 16-bit PNG
                stored, sw, sh = _png16(finish(open_bytes(data, out.source), out.source, data, channels=1))
                ext = "png"
            else:  # a format the readers need not know: store it as PNG
                full = finish(open_bytes(data, out.source), out.source, data)
                buf = io.BytesIO()
                full.save(buf, format="PNG")
                stored, ext, sw, sh = buf.getvalue(), "png", full.width, full.height
        if exif_orientation(img) in (5, 6, 7, 8):  # only after decoding: PNG reads EXIF by loading
            width, height = height, width
        out.data, out.ext = stored, ext
        out.row = {"key": digest[:KEY_HEX], "sha256": digest, "source": out.source, "bytes": len(data),
                   "width": width, "height": height, "format": fmt, "stored_format": ext, "stored_bytes": len(stored),
                   "stored_width": sw, "stored_height": sh}
    except BadImage as e:
        out.reason, out.detail = e.reason, e.detail
    except Exception as e:  # never let one file stop a million-file job
        out.reason, out.detail = "corrupt", f"{type(e).__name__}: {e}"
    return out


def _prepare_star(args: tuple) -> Prepared:
    *job, index = args
    out = prepare(*job)
    if index and out.row is not None:  # the pile index's descriptors, from the bytes in hand
        from .index import describe_sample

        out.described = describe_sample(out.data, f"{out.row['key']}.{out.ext}")
    return out


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _fsync_write(path: Path, text: str, append: bool = True) -> int:
    """Append (or write) text, flush and fsync; returns the file size after."""
    with open(path, "a" if append else "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


def _csv_text(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def _read_sidecar(path: str | Path | None) -> tuple[list[str], dict[str, dict]]:
    if not path:
        return [], {}
    p = Path(path)
    try:
        with open(p, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            if "path" not in fields:
                raise DataError(f"sidecar {p} needs a 'path' column (the input path as listed); it has {fields}")
            rows = {r["path"]: r for r in reader}
    except OSError as e:
        raise DataError(f"cannot read sidecar {p}: {e.strerror or e}") from None
    extra = []
    for name in fields:
        if name == "path":
            continue
        clean = "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in name.strip()) or "column"
        extra.append(clean if clean not in MANIFEST_COLUMNS else f"meta_{clean}")
    mapping = dict(zip([n for n in fields if n != "path"], extra))
    return extra, {k: {mapping[c]: v for c, v in r.items() if c in mapping} for k, r in rows.items()}


def _digest(names: list[str]) -> str:
    return hashlib.sha256("\n".join(printable(n) for n in names).encode()).hexdigest()[:16]


def _check_out(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in (MANIFEST, SKIPPED, INDEX, PROGRESS):
        if (out / name).is_symlink():
            raise DataError(f"{out / name} is a symlink; refusing to write through it")


def auto_shard_size(n_inputs: int) -> int:
    """Images per shard when none is given: ``n_inputs`` split evenly into as many shards as fill
    ``AUTO_SHARDS`` loader slots without going under ``MIN_AUTO_SHARD`` images (one shard for a pile
    smaller than that), capped at ``MAX_AUTO_SHARD`` (a large pile gets more shards)."""
    n_shards = min(max(n_inputs // MIN_AUTO_SHARD, 1), AUTO_SHARDS)
    return max(1, min(-(-n_inputs // n_shards), MAX_AUTO_SHARD))


def write_shards(src: str | Path, out: str | Path, shard_size: int = 0, max_side: int = 0,
                 sidecar: str | Path | None = None, workers: int = 0,
                 log: Callable[[str], None] | None = None, read_timeout: float | None = None,
                 denylist: str = "", show_progress: bool = False, index: bool = True) -> dict:
    """Write (or finish writing) shards of ``src`` into ``out``; returns the summary (index.json).

    ``shard_size`` 0 (the default) picks it from the input count (``auto_shard_size``; on resume, the
    size the interrupted run recorded). ``show_progress`` reports the inputs read through
    ``openseer.progress`` (a bar, or plain lines in a file). ``index``: each shard's part of the
    pile index (data/index.py, ``DIR/.openseer-index``) is written with it, described in the workers
    from the bytes stored, so ``openseer index DIR`` afterwards has nothing to do."""
    if shard_size < 0:
        raise DataError("--shard-size must be >= 1 (or 0: chosen from the number of inputs)")
    if max_side < 0:
        raise DataError("--max-side must be >= 0 (0 keeps the original size)")
    log = log or (lambda text: None)
    out = Path(out).expanduser()
    coll = open_collection(str(src), denylist=denylist, read_timeout=read_timeout, shards=False)
    base, names, deny = Path(coll.base or "."), [e.name for e in coll.entries], coll.deny
    frames = [e.frame for e in coll.entries]
    window = coll.decoding.dicom_window
    extra_cols, side = _read_sidecar(sidecar)
    columns = MANIFEST_COLUMNS + extra_cols
    if not shard_size:
        shard_size = _recorded_shard_size(out) or auto_shard_size(len(names))
        log(f"{shard_size} images per shard for {len(names)} inputs (--shard-size sets another)")
    params = {"source": str(Path(src).expanduser().resolve()), "shard_size": shard_size, "max_side": max_side,
              "sidecar": str(Path(sidecar).resolve()) if sidecar else "", "inputs": len(names),
              "inputs_digest": _digest([e.name + e.suffix for e in coll.entries]), "columns": columns,
              "dicom_window": window}
    _check_out(out)
    progress = _load_progress(out, params)
    shards: list[dict] = progress["shards"]
    counts = Counter(progress["counts"])
    seen: set[bytes] = set()
    manifest, skipped = out / MANIFEST, out / SKIPPED
    if progress["next_input"] == 0 and not shards:
        _fsync_write(manifest, _csv_text([dict(zip(columns, columns))], columns), append=False)
        _fsync_write(skipped, _csv_text([dict(zip(SKIPPED_COLUMNS, SKIPPED_COLUMNS))], SKIPPED_COLUMNS), append=False)
        progress["manifest_bytes"], progress["skipped_bytes"] = manifest.stat().st_size, skipped.stat().st_size
        atomic_write_json(out / PROGRESS, progress)
    else:  # resume: drop rows of the unfinished shard, and tars not yet committed
        for path, size in ((manifest, progress["manifest_bytes"]), (skipped, progress["skipped_bytes"])):
            with open(path, "r+b") as f:
                f.truncate(size)
        with open(manifest, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                seen.add(bytes.fromhex(row["sha256"]))
        log(f"resuming: {len(shards)} shard(s) complete, continuing at input {progress['next_input']} of {len(names)}")
    for p in out.iterdir():
        if p.name.startswith(".") and p.name.endswith(".partial"):
            p.unlink()
        elif p.suffix == ".tar" and p.stem.isdigit() and int(p.stem) >= len(shards):
            p.unlink()

    start = progress["next_input"]
    pending: list[Prepared] = []
    skipped_rows: list[dict] = []
    t0 = time.perf_counter()

    def commit(next_input: int) -> None:
        if not pending:  # only skipped inputs since the last shard: record them, write no empty tar
            progress["skipped_bytes"] = _fsync_write(skipped, _csv_text(skipped_rows, SKIPPED_COLUMNS))
            progress.update(next_input=next_input, counts=dict(counts))
            atomic_write_json(out / PROGRESS, progress)
            skipped_rows.clear()
            return
        number = len(shards)
        name = f"{number:06d}.tar"
        partial = out / f".{name}.partial"
        h = hashlib.sha256()
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with os.fdopen(fd, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                rows = []
                for pos, p in enumerate(pending):
                    row = dict(p.row or {}, shard=name, position=pos)
                    row.update(side.get(p.source, {}))
                    meta = {k: row[k] for k in ("key", "sha256", "width", "height", "format",
                                                "stored_width", "stored_height")}
                    _tar_add(tar, f"{row['key']}.{p.ext}", p.data)
                    _tar_add(tar, f"{row['key']}.json", json.dumps(meta).encode())
                    rows.append(row)
            raw.flush()
            os.fsync(raw.fileno())
        h.update(partial.read_bytes())
        final = out / name
        if final.is_symlink():
            final.unlink()
        os.replace(partial, final)
        progress["manifest_bytes"] = _fsync_write(manifest, _csv_text(rows, columns))
        progress["skipped_bytes"] = _fsync_write(skipped, _csv_text(skipped_rows, SKIPPED_COLUMNS))
        shards.append({"name": name, "samples": len(pending), "bytes": final.stat().st_size, "sha256": h.hexdigest()})
        progress.update(next_input=next_input, shards=shards, counts=dict(counts))
        atomic_write_json(out / PROGRESS, progress)
        if index:  # after the commit: a crash in between leaves the shard for `openseer index` to describe
            from .index import add_shard_part

            add_shard_part(final, [(str(p.row["key"]), p.described) for p in pending])  # type: ignore[index,misc]
        rate = (next_input - start) / max(time.perf_counter() - t0, 1e-9)
        log(f"{name}: {len(pending)} images; {next_input}/{len(names)} inputs done ({rate:.0f}/s)")
        pending.clear()
        skipped_rows.clear()

    jobs = ((i, str(base), names[i], max_side, coll.read_timeout, frames[i], window, index)
            for i in range(start, len(names)))
    n_workers = workers or min(4, os.cpu_count() or 1)
    bar = progress_bar("shard", total=len(names), unit="input", initial=start, enabled=show_progress)
    if bar.style == "bar":  # per-shard lines above the live bar, not through it
        log = bar.write
    for item in _map(jobs, n_workers):
        bar.update(1)
        if not item.reason and deny.keys and (deny.denies(item.source) or deny.denies(item.sha256[:KEY_HEX])
                                              or deny.denies(printable(names[item.index]))
                                              or deny.denies(item.file_sha256[:KEY_HEX])):
            item.reason, item.detail = "denied", "on the deny-list"
        if item.reason:
            counts[f"skipped_{item.reason}"] += 1
            skipped_rows.append({"source": item.source, "reason": item.reason, "detail": printable(item.detail)[:300]})
        else:
            digest = bytes.fromhex(item.sha256)
            if digest in seen:
                counts["skipped_duplicate"] += 1
                skipped_rows.append({"source": item.source, "reason": "duplicate", "detail": item.sha256[:KEY_HEX]})
            else:
                seen.add(digest)
                counts["stored"] += 1
                pending.append(item)
        if len(pending) == shard_size:
            commit(item.index + 1)
    if pending or skipped_rows:
        commit(len(names))
    bar.close()
    progress.update(next_input=len(names), counts=dict(counts), done=True)
    atomic_write_json(out / PROGRESS, progress)
    summary = {"format": "openseer.shards.v1", "shards": shards, "total": sum(s["samples"] for s in shards),
               "counts": dict(counts), "params": params, "manifest": MANIFEST, "skipped": SKIPPED}
    atomic_write_json(out / INDEX, summary)
    return summary


def _map(jobs: Iterator[tuple], workers: int) -> Iterator[Prepared]:
    """``prepare`` over the jobs in order, in worker processes when ``workers`` > 1."""
    if workers <= 1:
        for job in jobs:
            yield _prepare_star(job)
        return
    with get_context("spawn" if os.name != "posix" else "fork").Pool(workers) as pool:
        yield from pool.imap(_prepare_star, jobs, chunksize=4)


def _recorded_shard_size(out: Path) -> int:
    """The shard size an interrupted run in ``out`` recorded (0 when none), so that re-running the
    same command without --shard-size resumes it."""
    if (out / PROGRESS).is_symlink():  # refused by _check_out
        return 0
    try:
        size = json.loads((out / PROGRESS).read_text())["params"]["shard_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    return size if isinstance(size, int) and size > 0 else 0


def _load_progress(out: Path, params: dict) -> dict:
    path = out / PROGRESS
    fresh = {"format": "openseer.shard-progress.v1", "params": params, "next_input": 0, "shards": [],
             "counts": {}, "manifest_bytes": 0, "skipped_bytes": 0, "done": False}
    if not path.is_file():
        leftovers = [p.name for p in out.iterdir() if p.suffix == ".tar" or p.name in (MANIFEST, INDEX)]
        if leftovers:
            raise DataError(f"{out} already holds shards ({leftovers[0]}, ...) but no {PROGRESS}; "
                            f"choose an empty --out")
        return fresh
    try:
        progress = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is unreadable ({e}); remove {out} and start again") from None
    old = progress.get("params", {})
    for key in ("source", "shard_size", "max_side", "sidecar", "inputs_digest", "columns", "dicom_window"):
        if old.get(key, "auto" if key == "dicom_window" else None) != params.get(key):
            what = "the input list changed" if key == "inputs_digest" else f"{key}: {old.get(key)!r} vs {params.get(key)!r}"
            raise DataError(f"{out} holds shards written with other settings ({what}); "
                            f"use the same command to resume, or another --out")
    return progress


# ---------------------------------------------------------------- report


def report(folder: str | Path) -> dict:
    """Counts, sizes, formats, duplicates and skipped-by-reason of a shard folder."""
    folder = Path(folder)
    index_path = folder / INDEX
    if not index_path.is_file():
        raise DataError(f"{folder} has no {INDEX}: is it a folder written by `openseer shard` (and finished)?")
    index = json.loads(index_path.read_text())
    formats: Counter = Counter()
    stored_formats: Counter = Counter()
    n, orig_bytes, stored_bytes = 0, 0, 0
    pixels = []
    with open(folder / MANIFEST, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            n += 1
            formats[row["format"]] += 1
            stored_formats[row.get("stored_format", "")] += 1
            orig_bytes += int(row["bytes"])
            stored_bytes += int(row["stored_bytes"])
            pixels.append(int(row["width"]) * int(row["height"]))
    skipped: Counter = Counter()
    if (folder / SKIPPED).is_file():
        with open(folder / SKIPPED, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                skipped[row["reason"]] += 1
    pixels.sort()

    def pct(q: float) -> float:
        return round(pixels[min(int(q * len(pixels)), len(pixels) - 1)] / 1e6, 3) if pixels else 0.0

    deny = None
    if (folder / "takedowns.txt").is_file():
        d = DenyList.load(folder / "takedowns.txt")
        deny = {"entries": len(d), "version": d.version}
    return {
        "folder": str(folder), "shards": len(index.get("shards", [])), "images": n,
        "inputs": index.get("params", {}).get("inputs"),
        "duplicates": skipped.get("duplicate", 0),
        "skipped": {k: v for k, v in sorted(skipped.items()) if k != "duplicate"},
        "original_bytes": orig_bytes, "stored_bytes": stored_bytes,
        "shard_bytes": sum(s["bytes"] for s in index.get("shards", [])),
        "formats": dict(formats.most_common()), "stored_formats": dict(stored_formats.most_common()),
        "megapixels": {"min": pct(0), "median": pct(0.5), "p90": pct(0.9), "max": pct(1.0)},
        "max_side": index.get("params", {}).get("max_side"), "denylist": deny,
    }

