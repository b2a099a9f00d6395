"""The persistent index of a pile: near-copy descriptors computed once per image, stored beside it.

``openseer index PILE`` describes every image of a folder, a file list or local tar shards
(data/nearcopy.py ``describe_pile_image``: the whole image, its mirror image and a few crop
windows) and stores the result in ``ROOT/.openseer-index/`` (``ROOT``: the folder, the list's
folder, the shards' folder; ``--index DIR`` puts it elsewhere)::

    index.json            format, descriptor version, the parts and what each covers
    parts/NNNNNN.json     one row per image: source, identity, key, content key, size, status, ...
    parts/NNNNNN.npy      descriptors of its described rows (float32, N x 256)
    parts/NNNNNN.flip.npy the mirror images' descriptors; parts/NNNNNN.win.npy the windows' (float16)
    snapshots/DIGEST/     the checked index of one pile spec, consolidated: what a takedown opens
                          (``QuickIndex``, in its section below)

A part is one shard (identified by its file's size and modification time) or up to
``FILES_PER_PART`` files (each identified by its own size and modification time), written whole
and atomically, its ``.json`` last: an interrupted build keeps its finished parts and the next run
goes on from there. Running it again extends the index: new files or shards are described,
unchanged ones are kept, changed ones described again and vanished ones dropped. Part files the
manifest does not list (an interrupted part) are removed when a build starts.

Under ``torchrun --nproc_per_node N -m openseer index PILE`` (``build_index``'s ``ranks``) rank 0
plans the parts and their ids, rank k describes parts k, k+N, ... and rank 0 adds each round of N
to the manifest in plan order: the index is the one a single process writes, byte for byte.

``open_index`` is what ``takedown add|check --near`` and ``curate`` read. It checks the index
against the pile as listed now and refuses, naming them, a source that changed since it was
described, one that is not indexed yet, an indexed one that no longer exists, or another
descriptor version: an index that no longer matches its pile is never used. A candidate found in
it is decoded again for verification (a file is read, a shard sample read at its recorded offset),
so a takedown decodes only its candidates.

``openseer shard`` writes each shard's part as it writes the shard (``describe_sample`` in its
workers, ``add_shard_part``): the files this build would write.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..fileio import atomic_write_json, name_to_text, text_to_name
from .collection import Collection, FileCollection, ShardCollection, open_collection
from .decode import BadImage, DataError, decode_bytes, is_dicom, open_bytes, read_bytes
from .denylist import DenyList, content_key
from .nearcopy import (
    DESCRIPTOR_VERSION,
    READ_SIDE,
    SIDE,
    WINDOWS,
    CopyIndex,
    CopyQueries,
    describe_pile_image,
)
from .stream import SAMPLE_IMAGE_EXTS, iter_shard

FORMAT = "openseer.index.v1"
INDEX_DIR = ".openseer-index"
MANIFEST = "index.json"
FILES_PER_PART = 1024
COLUMNS = ["source", "size", "mtime_ns", "name", "content_key", "position", "offset", "length", "width",
           "height", "bytes", "status", "vec"]


class IndexMismatch(DataError):
    """A pile index that does not match its pile (or cannot be written): what, and how to fix it."""


# ---------------------------------------------------------------- where, and what identifies a source


def index_folder(coll: Collection, index: str | Path = "") -> Path:
    """The index folder of a pile: ``index`` when given, else ``ROOT/.openseer-index``."""
    if index:
        return Path(index).expanduser()
    if isinstance(coll, ShardCollection):
        if coll.root is None or any(u.startswith("pipe:") for u in coll.urls):
            raise IndexMismatch(f"{coll.spec}: pipe: shards cannot be indexed (no file to check the index "
                                f"against); index local shards, or run --near without an index (--no-index)")
        return coll.root / INDEX_DIR
    if isinstance(coll, FileCollection) and coll.base is not None:
        return coll.base / INDEX_DIR
    raise IndexMismatch(f"{coll.spec} is held in memory: it has no folder to keep an index in "
                        f"(--near scans it; write it out as image files to index it)")


def _source(path: str | os.PathLike, root: Path) -> str:
    """A source's name in the index: its path relative to the index's root folder, else absolute."""
    p = os.path.abspath(os.fspath(path))
    r = os.path.abspath(root)
    rel = p[len(r) + 1:] if p.startswith(r + os.sep) else os.path.relpath(p, r)  # the first: 20x quicker
    return name_to_text(p if rel.startswith("..") else rel)


def _source_path(source: str, root: Path) -> str:
    name = text_to_name(source)
    return name if os.path.isabs(name) else os.path.join(os.fspath(root), name)


def _identity(path: str | os.PathLike) -> tuple[int, int]:
    """(bytes, modification time in ns) of a file; (-1, -1) when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return int(st.st_size), int(st.st_mtime_ns)


def _root(folder: Path) -> Path:
    """The folder sources are named relative to: the one holding the index folder."""
    return folder.resolve().parent


# ---------------------------------------------------------------- describing


def _describe_bytes(data: bytes, where: str) -> tuple[dict, tuple | None]:
    """Row fields and descriptors of one image's bytes (status says why there are none)."""
    row = {"content_key": content_key(data), "bytes": len(data), "width": 0, "height": 0, "status": ""}
    try:
        img = decode_bytes(data, where, draft_size=READ_SIDE)  # as the near-copy scan decodes it
        head = img if is_dicom(data) else open_bytes(data, where)  # full size (a JPEG may be draft-reduced)
        row["width"], row["height"] = int(head.width), int(head.height)
    except BadImage as e:
        row["status"] = e.reason
        return row, None
    d = describe_pile_image(img)
    if d is None:
        row["status"] = "flat"
    return row, d


def _member_offsets(path: str) -> dict[str, dict[str, tuple[int, int]]]:
    """Sample key -> extension -> (data offset, size) of a local tar, from its headers."""
    from webdataset.tariterators import base_plus_ext

    out: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if m.isreg():
                    prefix, ext = base_plus_ext(m.name)
                    if prefix is not None:
                        out.setdefault(prefix, {})[ext] = (int(m.offset_data), int(m.size))
    except (OSError, tarfile.TarError, EOFError):
        pass  # a damaged shard: what could be read
    return out


class _Part:
    """Rows and descriptors of one part being written."""

    def __init__(self) -> None:
        self.cols: dict[str, list] = {c: [] for c in COLUMNS}
        self.vecs: list[np.ndarray] = []
        self.flips: list[np.ndarray] = []
        self.wins: list[np.ndarray] = []

    def add(self, row: dict, d: tuple | None) -> None:
        row = dict(row)
        row["vec"] = -1
        if d is not None:
            row["vec"] = len(self.vecs)
            self.vecs.append(d[0])
            self.flips.append(d[1])
            self.wins.append(d[2].astype(np.float16))
        for c in COLUMNS:
            self.cols[c].append(row.get(c, -1 if c in ("position", "offset", "length") else ""))

    def write(self, folder: Path, pid: str) -> None:
        parts = folder / "parts"
        parts.mkdir(parents=True, exist_ok=True)
        n = len(self.vecs)
        arrays = {"npy": (np.stack(self.vecs) if n else np.zeros((0, SIDE * SIDE), np.float32)),
                  "flip.npy": (np.stack(self.flips) if n else np.zeros((0, SIDE * SIDE), np.float32)),
                  "win.npy": (np.stack(self.wins) if n else np.zeros((0, len(WINDOWS), SIDE * SIDE), np.float16))}
        for ext, a in arrays.items():
            tmp = parts / f".{pid}.{ext}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                np.save(f, a)
            os.replace(tmp, parts / f"{pid}.{ext}")
        atomic_write_json(parts / f"{pid}.json", self.cols)  # last: marks the part done

    def __len__(self) -> int:
        return len(self.cols["source"])


def _read_part(folder: Path, pid: str) -> dict[str, list]:
    try:
        return json.loads((folder / "parts" / f"{pid}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise IndexMismatch(f"the pile index {folder} is damaged: part {pid}: {e}; rebuild it with "
                            f"`openseer index PILE --rebuild`") from None


def _remove_part(folder: Path, pid: str) -> None:
    for ext in ("json", "npy", "flip.npy", "win.npy"):
        (folder / "parts" / f"{pid}.{ext}").unlink(missing_ok=True)


def _load_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise IndexMismatch(f"the pile index {path} is unreadable ({e}); rebuild it with "
                            f"`openseer index PILE --rebuild`") from None
    if doc.get("format") != FORMAT:
        raise IndexMismatch(f"{path} is not an openseer pile index ({doc.get('format')!r})")
    return doc


def _save_manifest(folder: Path, doc: dict) -> None:
    doc["updated_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    atomic_write_json(folder / MANIFEST, doc)


def _new_manifest() -> dict:
    return {"format": FORMAT, "descriptor": DESCRIPTOR_VERSION, "windows": len(WINDOWS), "parts": [], "next": 0}


# ---------------------------------------------------------------- building and extending


class OneProcess:
    """The rank split of a build run in one process (rank 0 of 1). Under torchrun the command passes
    its ``use.ranks.Ranks`` instead, which has the same four members."""

    rank, world, is_main = 0, 1, True

    def on_main(self, fn, *args):
        return fn(*args)

    def gather(self, value) -> list:
        return [value]


def build_index(spec: str, index: str | Path = "", rebuild: bool = False, progress: bool = True,
                log=print, workers: int = 0, ranks=None, files_per_part: int = 0) -> dict:
    """Build or extend the index of the pile ``spec`` (see the module docstring); returns counts:
    images described now, kept from before, dropped, the folder, the seconds taken. ``workers``:
    processes reading and describing files (folders and lists; 0: in this process);
    ``files_per_part``: files in one part (0: ``FILES_PER_PART``; smaller parts resume and spread
    over ranks more finely).

    ``ranks`` (``use.ranks.Ranks`` under torchrun; default one process): rank 0 prepares the index
    folder (manifest, stale rows dropped) and plans the parts to describe, each with its id; the
    k-th part goes to rank k mod N, which writes its files; after every round of N parts rank 0
    adds them to the manifest in plan order. So N ranks write the same index as one process, and an
    interrupted build keeps the rounds it finished."""
    from ..progress import progress as bar

    ranks = ranks or OneProcess()
    t0 = time.perf_counter()
    coll = open_collection(spec)
    coll.deny = DenyList()  # every image is indexed, also deny-listed ones (check --near reports which are)
    folder = index_folder(coll, index)
    doc, plan, stats = ranks.on_main(_prepare, coll, folder, rebuild, log, files_per_part or FILES_PER_PART)
    root = _root(folder)
    with bar("index", total=coll.n, unit="img", enabled=progress and ranks.is_main) as p:
        p.update(stats["kept"])
        for start in range(0, len(plan), ranks.world):
            k = start + ranks.rank
            done = _describe_part(coll, folder, root, plan[k], workers) if k < len(plan) else None
            finished = [d for d in ranks.gather(done) if d is not None]
            ranks.on_main(_commit, folder, doc, finished, stats)
            p.update(sum(d["info"]["rows"] for d in finished))
    seconds = time.perf_counter() - t0
    total = ranks.on_main(lambda: sum(int(x["rows"]) for x in _load_manifest(folder)["parts"]))
    stats = ranks.on_main(lambda: stats)
    ranks.on_main(_keep_snapshot, spec, index)
    return {"folder": str(folder), "described": stats["described"], "kept": stats["kept"],
            "dropped": stats["dropped"], "rows": total, "statuses": dict(stats["statuses"]),
            "seconds": round(seconds, 2), "images_per_s": round(stats["described"] / seconds, 1) if seconds else 0.0}


def _keep_snapshot(spec: str, index: str | Path) -> None:
    """Check the index just built against its pile and keep the snapshot takedowns open (its approximate
    search structure included: built here once, not on the first takedown)."""
    time.sleep(RACY_NS / 1e9)  # the manifest was just written: a snapshot taken now would not trust it
    try:
        open_index(spec, index)
    except DataError:
        pass  # the pile changed during the build: the next open names what


def _prepare(coll: Collection, folder: Path, rebuild: bool, log, per_part: int) -> tuple[dict, list[dict], dict]:
    """(manifest, plan, counts) of a build: the index folder made or reset, stale rows dropped; the
    plan lists the parts to describe, each with its id (a shard, or up to FILES_PER_PART files)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise IndexMismatch(f"cannot write the pile index {folder}: {e.strerror or e}; give --index DIR") from None
    doc = None if rebuild else _load_manifest(folder)
    if doc is not None and doc.get("descriptor") != DESCRIPTOR_VERSION:
        log(f"openseer: {folder} holds descriptors of version {doc.get('descriptor')}; this openseer uses "
            f"{DESCRIPTOR_VERSION}: describing the pile again")
        doc = None
    if doc is None:
        for p in (folder / "parts").glob("*") if (folder / "parts").is_dir() else []:
            p.unlink()
        doc = _new_manifest()
        _save_manifest(folder, doc)
    ids = {x["id"] for x in doc["parts"]}
    for p in (folder / "parts").glob("*") if (folder / "parts").is_dir() else []:
        if p.name.split(".")[0] not in ids:  # a part an interrupted build (or rank) did not finish
            p.unlink(missing_ok=True)
    root = _root(folder)
    stats: dict = {"described": 0, "kept": 0, "dropped": 0, "statuses": Counter()}
    if isinstance(coll, ShardCollection):
        plan = _plan_shards(coll, root, doc, stats)
    else:
        plan = _plan_files(coll, folder, root, doc, stats, per_part)
    for task in plan:
        task["id"] = _next_id(doc)
    return doc, plan, stats


def _next_id(doc: dict) -> str:
    pid = f"{int(doc.get('next', 0)):06d}"
    doc["next"] = int(doc.get("next", 0)) + 1
    return pid


def _commit(folder: Path, doc: dict, finished: list[dict], stats: dict) -> None:
    """Add described parts to the manifest (rank 0), in plan order; a shard's new part replaces its old one."""
    for d in sorted(finished, key=lambda d: d["info"]["id"]):
        old = d.get("replaces")
        if old is not None:
            doc["parts"] = [x for x in doc["parts"] if x["id"] != old["id"]]
            _remove_part(folder, old["id"])
            stats["dropped"] += int(old["rows"])
        doc["parts"].append(d["info"])
        stats["described"] += int(d["info"]["rows"])
        for st, n in d["statuses"].items():
            stats["statuses"][st] += n
    if finished:
        _save_manifest(folder, doc)


def _part_done(info: dict, part: _Part, replaces: dict | None = None) -> dict:
    return {"info": info, "replaces": replaces, "statuses": dict(Counter(s or "described" for s in part.cols["status"]))}


def _describe_part(coll: Collection, folder: Path, root: Path, task: dict, workers: int) -> dict:
    """Describe one planned part and write its files (any rank); what rank 0 adds to the manifest."""
    if task["kind"] == "shard":
        return _describe_shard(coll, folder, task)  # type: ignore[arg-type]
    entries = [coll.entries[j] for j in task["rows"]]  # type: ignore[attr-defined]
    ds = _DescribeFiles(entries, [_source(e.path, root) for e in entries], coll.read_timeout)  # type: ignore[attr-defined]
    if workers and len(ds) > 1:
        import torch

        described = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=min(workers, len(ds)),
                                                     shuffle=False, collate_fn=_as_is, prefetch_factor=16))
    else:
        described = (ds[i] for i in range(len(ds)))
    part = _Part()
    for row, d in described:
        part.add(row, d)
    part.write(folder, task["id"])
    return _part_done({"id": task["id"], "kind": "files", "rows": len(part), "described": len(part.vecs)}, part)


def _plan_shards(coll: ShardCollection, root: Path, doc: dict, stats: dict) -> list[dict]:
    by_source = {x["source"]: x for x in doc["parts"] if x["kind"] == "shard"}
    plan = []
    for url in coll.urls:
        src = _source(url, root)
        size, mtime = _identity(url)
        old = by_source.get(src)
        if old is not None and (old["size"], old["mtime_ns"]) == (size, mtime):
            stats["kept"] += int(old["rows"])
            continue
        plan.append({"kind": "shard", "url": url, "source": src, "size": size, "mtime_ns": mtime, "replaces": old})
    return plan


def _describe_shard(coll: ShardCollection, folder: Path, task: dict) -> dict:
    url, src, size, mtime = task["url"], task["source"], task["size"], task["mtime_ns"]
    part = _Part()
    offsets = _member_offsets(url)
    errors: list[str] = []
    for s in iter_shard(url, 0, errors, coll.pipe_timeout):
        base = {"source": src, "size": size, "mtime_ns": mtime, "name": s.key, "position": s.position}
        if s.data is None:
            part.add({**base, "status": s.reason or "no_image"}, None)
        else:
            row, d = _describe_bytes(s.data, f"{Path(url).name}:{s.key}")
            ext = next((e for e in SAMPLE_IMAGE_EXTS if e in offsets.get(s.key, {})), None)
            if ext is not None:
                row["offset"], row["length"] = offsets[s.key][ext]
            part.add({**base, **row}, d)
    if errors:
        part.add({"source": src, "size": size, "mtime_ns": mtime, "name": f"{Path(url).name}#error",
                  "status": "shard_error"}, None)
    part.write(folder, task["id"])
    info = {"id": task["id"], "kind": "shard", "source": src, "size": size, "mtime_ns": mtime,
            "rows": len(part), "described": len(part.vecs)}
    return _part_done(info, part, task["replaces"])


class _DescribeFiles:
    """Files to describe (a map-style dataset: loader workers decode and describe in parallel)."""

    def __init__(self, entries: list, srcs: list[str], read_timeout: float):
        self.entries, self.srcs, self.read_timeout = entries, srcs, read_timeout

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int):
        e = self.entries[i]
        size, mtime = _identity(e.path)
        base = {"source": self.srcs[i], "size": size, "mtime_ns": mtime, "name": e.key}
        try:
            data = read_bytes(e.path, self.read_timeout)
        except BadImage as err:
            return {**base, "status": err.reason}, None
        row, d = _describe_bytes(data, name_to_text(e.path))
        return {**base, **row}, d


def _plan_files(coll: FileCollection, folder: Path, root: Path, doc: dict, stats: dict,
                per_part: int) -> list[dict]:
    """Drop the index rows of changed or vanished files; plan the listed files not indexed as they are."""
    srcs = [_source(e.path, root) for e in coll.entries]
    listed = dict(zip(srcs, range(len(srcs))))
    drop: dict[str, list[int]] = {}  # part id -> rows to drop
    have: set[str] = set()
    for info in [x for x in doc["parts"] if x["kind"] == "files"]:
        cols = _read_part(folder, info["id"])
        for i, src in enumerate(cols["source"]):
            j = listed.get(src)
            if j is not None and src not in have:
                if _identity(coll.entries[j].path) == (cols["size"][i], cols["mtime_ns"][i]):
                    have.add(src)
                    continue
            elif j is None and os.path.lexists(_source_path(src, root)):
                continue  # not in this listing, still there (another list sharing the index): kept
            drop.setdefault(info["id"], []).append(i)
    for info in [x for x in doc["parts"] if x["id"] in drop]:
        _rewrite_without(folder, info, set(drop[info["id"]]), doc)
        stats["dropped"] += len(drop[info["id"]])
    _save_manifest(folder, doc)
    stats["kept"] += len(have)
    todo = [j for j, src in enumerate(srcs) if src not in have]
    return [{"kind": "files", "rows": todo[i:i + per_part]} for i in range(0, len(todo), per_part)]


def _as_is(sample):
    """A loader's sample unchanged (no conversion of numpy arrays to tensors)."""
    return sample


def _rewrite_without(folder: Path, info: dict, rows: set[int], doc: dict) -> None:
    """Part ``info`` without ``rows`` (its descriptors too), written under a new id."""
    cols = _read_part(folder, info["id"])
    arrs = _arrays(folder, info["id"])
    part = _Part()
    for i in range(len(cols["source"])):
        if i in rows:
            continue
        v = cols["vec"][i]
        row = {c: cols[c][i] for c in COLUMNS}
        part.add(row, None if v < 0 else (arrs[0][v], arrs[1][v], arrs[2][v]))
    doc["parts"].remove(info)
    if len(part):
        pid = _next_id(doc)
        part.write(folder, pid)
        doc["parts"].append({**info, "id": pid, "rows": len(part), "described": len(part.vecs)})
    _save_manifest(folder, doc)
    _remove_part(folder, info["id"])


def _arrays(folder: Path, pid: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = folder / "parts"
    try:
        return (np.load(p / f"{pid}.npy", mmap_mode="r"), np.load(p / f"{pid}.flip.npy", mmap_mode="r"),
                np.load(p / f"{pid}.win.npy", mmap_mode="r"))
    except (OSError, ValueError) as e:
        raise IndexMismatch(f"the pile index {folder} is damaged: part {pid}: {e}; rebuild it with "
                            f"`openseer index PILE --rebuild`") from None


def describe_sample(data: bytes, where: str) -> tuple[dict, tuple | None]:
    """What the index stores of one shard sample's image bytes (``openseer shard`` calls it in its
    workers, on the bytes it stores, while it has them in memory)."""
    return _describe_bytes(data, where)


def add_shard_part(url: str | Path, samples: list[tuple[str, tuple[dict, tuple | None]]]) -> None:
    """Index a shard just written by ``openseer shard`` (``samples``: per sample in order, its key and
    ``describe_sample``'s result) into its folder's index, as ``openseer index SHARDS`` would: the
    same part files and manifest entry, so that a later ``openseer index`` finds nothing to do. A
    part already there for the shard (a resumed run writing it again) is replaced."""
    url = os.fspath(url)
    folder = Path(url).resolve().parent / INDEX_DIR
    folder.mkdir(parents=True, exist_ok=True)
    doc = _load_manifest(folder)
    if doc is None or doc.get("descriptor") != DESCRIPTOR_VERSION:
        for p in (folder / "parts").glob("*") if (folder / "parts").is_dir() else []:
            p.unlink()
        doc = _new_manifest()
    src = _source(url, _root(folder))
    size, mtime = _identity(url)
    offsets = _member_offsets(url)
    part = _Part()
    for position, (key, (row, d)) in enumerate(samples):
        row = {"source": src, "size": size, "mtime_ns": mtime, "name": key, "position": position, **row}
        ext = next((e for e in SAMPLE_IMAGE_EXTS if e in offsets.get(key, {})), None)
        if ext is not None:
            row["offset"], row["length"] = offsets[key][ext]
        part.add(row, d)
    pid = _next_id(doc)
    part.write(folder, pid)
    old = next((x for x in doc["parts"] if x.get("source") == src), None)
    if old is not None:
        doc["parts"].remove(old)
        _remove_part(folder, old["id"])
    doc["parts"].append({"id": pid, "kind": "shard", "source": src, "size": size, "mtime_ns": mtime,
                         "rows": len(part), "described": len(part.vecs)})
    _save_manifest(folder, doc)


# ---------------------------------------------------------------- reading (takedown --near, curate)


def _names(items: list[str], n: int = 3) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


class StoredIndex(CopyQueries):
    """The index of a pile as listed now (rows in the pile's order), checked against it.

    ``keys`` (the pile's keys: a file's name, a shard sample's key), ``paths``, ``content_keys``,
    ``vectors`` / ``flipped`` / ``windows`` (the described rows), ``pixels`` and ``nbytes`` per
    described row, and ``skipped`` (flat or unreadable images, by reason), as ``nearcopy.PileIndex``
    has them; ``copies_of(photo)`` answers a takedown decoding only the candidates."""

    def __init__(self, coll: Collection, folder: Path, doc: dict):
        self.coll, self.folder, self.spec = coll, folder, coll.spec
        root = _root(folder)
        problems: dict[str, list[str]] = {"changed": [], "not indexed": [], "gone": []}
        picked: list[tuple[str, int]] = []  # (part id, row) in pile order
        where: list[object] = []
        self.paths: list[str] = []
        if isinstance(coll, ShardCollection):
            by_source = {x["source"]: x for x in doc["parts"] if x["kind"] == "shard"}
            listed = set()
            for url in coll.urls:
                src = _source(url, root)
                listed.add(src)
                info = by_source.get(src)
                if info is None:
                    problems["not indexed"].append(Path(url).name)
                elif (info["size"], info["mtime_ns"]) != _identity(url):
                    problems["changed"].append(Path(url).name)
                else:
                    cols = _read_part(folder, info["id"])
                    for i in range(len(cols["source"])):
                        picked.append((info["id"], i))
                        where.append(url)
            problems["gone"] = [Path(_source_path(s, root)).name for s in by_source
                                if s not in listed and not os.path.exists(_source_path(s, root))]
        else:
            rows: dict[str, tuple[str, int]] = {}
            idents: dict[str, tuple[int, int]] = {}
            for info in [x for x in doc["parts"] if x["kind"] == "files"]:
                cols = _read_part(folder, info["id"])
                for i, src in enumerate(cols["source"]):
                    rows[src] = (info["id"], i)
                    idents[src] = (cols["size"][i], cols["mtime_ns"][i])
            listed = set()
            for e in coll.entries:  # type: ignore[attr-defined]
                src = _source(e.path, root)
                listed.add(src)
                if src not in rows:
                    problems["not indexed"].append(e.key)
                elif idents[src] != _identity(e.path):
                    problems["changed"].append(e.key)
                else:
                    picked.append(rows[src])
                    where.append(e.path)
            problems["gone"] = [s for s in rows if s not in listed and not os.path.lexists(_source_path(s, root))]
        bad = {k: v for k, v in problems.items() if v}
        if bad:
            what = "; ".join(f"{len(v)} {k} ({_names(v)})" for k, v in bad.items())
            raise IndexMismatch(f"the index {folder} no longer matches the pile {coll.spec}: {what}. Run "
                                f"`openseer index {coll.spec}` to bring it up to date (only those are described "
                                f"again), or pass --no-index to scan the pile")
        self._assemble(folder, picked, where)

    def _assemble(self, folder: Path, picked: list[tuple[str, int]], where: list[object]) -> None:
        cols_of: dict[str, dict] = {}
        arrs_of: dict[str, tuple] = {}
        self.keys, self.content_keys, self.paths, self.loc = [], [], [], []
        self.skipped: dict[str, int] = {}
        vec_rows: list[tuple[str, int]] = []
        pixels, nbytes = [], []
        for (pid, i), w in zip(picked, where):
            if pid not in cols_of:
                cols_of[pid] = _read_part(folder, pid)
            cols = cols_of[pid]
            v = cols["vec"][i]
            if v < 0:
                status = cols["status"][i]
                self.skipped[status] = self.skipped.get(status, 0) + 1
                continue
            name = cols["name"][i]
            self.keys.append(name)
            if isinstance(w, str):  # a shard url
                self.paths.append(f"{w}#{name}")
                self.loc.append((w, cols["offset"][i], cols["length"][i], cols["position"][i]))
            else:
                self.paths.append(name_to_text(w))
                self.loc.append((w, -1, -1, -1))
            self.content_keys.append(cols["content_key"][i])
            pixels.append(int(cols["width"][i]) * int(cols["height"][i]))
            nbytes.append(int(cols["bytes"][i]))
            vec_rows.append((pid, v))
        n = len(vec_rows)
        self.vectors = np.zeros((n, SIDE * SIDE), np.float32)
        self.flipped = np.zeros((n, SIDE * SIDE), np.float32)
        self.windows = np.zeros((n, len(WINDOWS), SIDE * SIDE), np.float16)
        by_part: dict[str, list[tuple[int, int]]] = {}
        for r, (pid, v) in enumerate(vec_rows):
            by_part.setdefault(pid, []).append((r, v))
        for pid, pairs in by_part.items():
            arrs_of[pid] = a = _arrays(folder, pid)
            dst = np.array([r for r, _ in pairs])
            src = np.array([v for _, v in pairs])
            self.vectors[dst], self.flipped[dst], self.windows[dst] = a[0][src], a[1][src], a[2][src]
        self.pixels = np.asarray(pixels, np.int64)
        self.nbytes = np.asarray(nbytes, np.int64)
        self.part_rows = ([p for p, _ in vec_rows], [v for _, v in vec_rows])  # where each row is stored
        self.index = CopyIndex(self.vectors)

    def __len__(self) -> int:
        return len(self.keys)

    def _read(self, r: int) -> bytes | None:
        path, offset, length, position = self.loc[r]
        try:
            if offset >= 0:
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read(length)
            elif isinstance(path, str) and position >= 0:  # a shard sample without a recorded offset
                data = next((s.data for s in iter_shard(path, 0) if s.position == position), None)
            else:
                data = read_bytes(path, getattr(self.coll, "read_timeout", None))
        except (OSError, BadImage):
            return None
        if data is None or content_key(data) != self.content_keys[r]:
            return None  # changed under the index since it was checked: not a match
        return data

    def images(self, wanted: set[int]) -> dict[int, Image.Image]:
        """Decode the pile images of descriptor rows ``wanted`` (only those), as the scan decodes them."""
        out: dict[int, Image.Image] = {}
        for r in sorted(wanted):
            data = self._read(r)
            if data is None:
                continue
            try:
                out[r] = decode_bytes(data, self.paths[r], draft_size=READ_SIDE)
            except BadImage:
                continue
        return out


# ---------------------------------------------------------------- the snapshot a takedown opens
#
# A takedown's quick way into the pile index: the checked index of one listing, consolidated on disk.
#
# ``open_index``'s full check (``StoredIndex``) lists the pile, looks at every file and
# reads every part's row table: Python work per image on every ``takedown --near`` (most of a second
# at 10,000 images, minutes at a million). Once a full check has passed, ``_write_snapshot`` keeps it
# in ``INDEX/snapshots/<digest of the pile spec>/``::
#
#     meta.json     the spec, what the check saw (the manifest's size and time, the descriptor version,
#                   the modification time of every folder of the pile, the size and time of a list file
#                   or of each shard), row count, skipped images by reason, the part ids
#     vectors.npy   the rows' descriptors in pile order (float32), memory-mapped when read (only with
#                   exact search: an approximate one holds them, and the parts have them for curate)
#     rows.npy      per row: tar offset, length, position, pixels, file bytes, part, row in the part
#     strings.bin / strings.npy   per row: key, path, content key, file to read (utf-8, with offsets)
#     search.faiss  the range search's index when it is approximate (search.py ``choose_range_kind``)
#
# ``_open_snapshot`` answers from it without listing the pile when nothing it recorded changed: a file
# added to, removed from or renamed within a folder changes that folder's modification time; a list
# file or a shard that changed has another size or time; ``openseer index`` rewrites the manifest.
# Any change sends ``open_index`` back to the full check (which names what no longer matches, and
# writes a new snapshot when it passes). A file rewritten in place under the same name leaves its
# folder's time alone: it is caught when it is a candidate (its content key is compared when it is
# read for verification: ``StoredIndex._read``), and by the next ``openseer index``.
# The per-row strings, the mirror images' and the windows' descriptors are read only when asked
# for (``curate`` asks; a takedown reads only its candidates' rows).

SNAPSHOT_FORMAT = "openseer.index-snapshot.v1"
SNAPSHOTS = "snapshots"
SNAP_STRINGS = 4  # key, path, content key, file to read
RACY_NS = 50_000_000  # 50 ms: far coarser than any file system's clock tick for modification times


def _snapshot_key(spec: str) -> str:
    return hashlib.sha256(os.path.abspath(spec).encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _mtime(path: str) -> int:
    try:
        return int(os.stat(path).st_mtime_ns)
    except OSError:
        return -1


def _stamp(path: str) -> list[int]:
    try:
        st = os.stat(path)
    except OSError:
        return [-1, -1]
    return [int(st.st_size), int(st.st_mtime_ns)]


def _watched(stored, since: int) -> tuple[dict[str, int], dict[str, list[int]]]:
    """(folder -> modification time, file -> [size, time]) whose change can change the pile's listing;
    one changed within ``RACY_NS`` of ``since`` (when the full check began) is recorded as never
    matching: it may have changed while the check ran, or may change again within the same clock
    tick and keep its time (git's racily clean files), so the next open checks in full."""
    from .collection import ShardCollection

    coll, index_dir = stored.coll, os.path.abspath(stored.folder)
    dirs: set[str] = set()
    files: list[str] = []
    if isinstance(coll, ShardCollection):
        files = [os.path.abspath(u) for u in coll.urls]
        dirs = {os.path.dirname(f) for f in files}
    elif getattr(coll, "list_file", None) is not None:
        files = [os.path.abspath(coll.list_file)]
        dirs = {os.path.dirname(os.path.abspath(e.path)) for e in coll.entries}
    else:  # a folder: every folder under it (a new sub-folder changes its parent's time)
        for top, subdirs, _ in os.walk(coll.base):
            top = os.path.abspath(top)
            subdirs[:] = [d for d in subdirs if os.path.join(top, d) != index_dir]
            dirs.add(top)
    racy = since - RACY_NS
    stamp = {d: _mtime(d) for d in sorted(dirs)}
    return ({d: (-2 if t > racy else t) for d, t in stamp.items()},
            {f: (lambda v: [-2, -2] if v[1] > racy else v)(_stamp(f)) for f in files})


def _write_snapshot(stored, spec: str, since: int) -> None:
    """Keep the checked index ``stored`` (a ``StoredIndex`` checked against ``spec`` from ``since``,
    ``time.time_ns()``) as a snapshot; a failure to write (a read-only pile) only costs the next call
    a full check."""
    import shutil

    from .search import VectorSearch, choose_range_kind

    folder = Path(stored.folder)
    dirs, files = _watched(stored, since)
    manifest = _stamp(str(folder / "index.json"))
    if manifest[1] > since - RACY_NS:
        manifest = [-2, -2]
    final = folder / SNAPSHOTS / _snapshot_key(spec)
    tmp = folder / SNAPSHOTS / f".{_snapshot_key(spec)}.{os.getpid()}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        n = len(stored.keys)
        kind = choose_range_kind(n)
        if kind == "flat":  # else the vectors are in the search index (and in the parts, for curate)
            np.save(tmp / "vectors.npy", np.ascontiguousarray(stored.vectors, np.float32))
        parts = sorted(set(stored.part_rows[0])) if n else []
        pnum = {p: i for i, p in enumerate(parts)}
        rows = np.zeros((n, 7), np.int64)
        for r, (_file, off, length, pos) in enumerate(stored.loc):
            rows[r, :3] = off, length, pos
        rows[:, 3], rows[:, 4] = stored.pixels, stored.nbytes
        rows[:, 5] = [pnum[p] for p in stored.part_rows[0]]
        rows[:, 6] = stored.part_rows[1]
        np.save(tmp / "rows.npy", rows)
        blobs, offs, at = [], [0], 0
        for r in range(n):
            for s in (stored.keys[r], stored.paths[r], stored.content_keys[r], os.fspath(stored.loc[r][0])):
                b = s.encode("utf-8", "surrogateescape")
                blobs.append(b)
                at += len(b)
                offs.append(at)
        (tmp / "strings.bin").write_bytes(b"".join(blobs))
        np.save(tmp / "strings.npy", np.asarray(offs, np.int64))
        if kind != "flat":
            VectorSearch(np.asarray(stored.vectors, np.float32), kind=kind).save(tmp / "search.faiss")
        atomic_write_json(tmp / "meta.json", {
            "format": SNAPSHOT_FORMAT, "spec": os.path.abspath(spec), "descriptor": DESCRIPTOR_VERSION,
            "manifest": manifest, "dirs": dirs, "files": files, "rows": n,
            "skipped": stored.skipped, "parts": parts, "search": kind})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def _open_snapshot(spec: str, index: str | os.PathLike = ""):
    """The snapshot of ``spec``'s index as a ``QuickIndex`` when one is kept and nothing it watched
    changed, else None (the caller runs the full check)."""
    if index:
        candidates = [Path(index).expanduser()]
    else:
        p = Path(spec).expanduser()
        candidates = [p / INDEX_DIR, p.parent / INDEX_DIR]
    for folder in candidates:
        snap = folder / SNAPSHOTS / _snapshot_key(spec)
        try:
            meta = json.loads((snap / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (meta.get("format") != SNAPSHOT_FORMAT or meta.get("spec") != os.path.abspath(spec)
                or meta.get("descriptor") != DESCRIPTOR_VERSION  # the reader's, now
                or meta.get("manifest") != _stamp(str(folder / "index.json"))
                or any(_mtime(d) != t for d, t in meta["dirs"].items())
                or any(_stamp(f) != v for f, v in meta["files"].items())):
            return None
        try:
            return QuickIndex(spec, folder, snap, meta)
        except (OSError, ValueError):
            return None
    return None


class _Strings(Sequence):
    """One of a snapshot's per-row strings (key, path, ...), decoded when read."""

    def __init__(self, blob: np.ndarray, offs: np.ndarray, which: int, n: int):
        self.blob, self.offs, self.which, self.n = blob, offs, which, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, r):
        if isinstance(r, slice):
            return [self[i] for i in range(*r.indices(self.n))]
        if r < 0:
            r += self.n
        if not 0 <= r < self.n:
            raise IndexError(r)
        j = SNAP_STRINGS * r + self.which
        return bytes(self.blob[int(self.offs[j]):int(self.offs[j + 1])]).decode("utf-8", "surrogateescape")

    def __iter__(self):
        blob = bytes(self.blob)
        offs = self.offs.tolist()
        for r in range(self.n):
            j = SNAP_STRINGS * r + self.which
            yield blob[offs[j]:offs[j + 1]].decode("utf-8", "surrogateescape")

    def __eq__(self, other) -> bool:
        return list(self) == list(other)


class _Loc(Sequence):
    """(file, tar offset, length, position) of each row, as ``StoredIndex.loc`` holds them."""

    def __init__(self, files: _Strings, rows: np.ndarray):
        self.files, self.rows = files, rows

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, r):
        off, length, pos = (int(v) for v in self.rows[r, :3])
        return self.files[r], off, length, pos


class QuickIndex(StoredIndex):
    """A ``StoredIndex`` read from its snapshot: the same members, read lazily (see the module docstring)."""

    def __init__(self, spec: str, folder: Path, snap: Path, meta: dict):
        from .search import VectorSearch

        self.coll, self.folder, self.spec, self.snapshot = None, folder, spec, snap
        n = int(meta["rows"])
        self.skipped = dict(meta["skipped"])
        self.parts = list(meta["parts"])
        self._rows = np.load(snap / "rows.npy", mmap_mode="r")
        self._vectors = np.load(snap / "vectors.npy", mmap_mode="r") if meta["search"] == "flat" else None
        blob = np.memmap(snap / "strings.bin", np.uint8, mode="r") if n else np.zeros(0, np.uint8)
        offs = np.load(snap / "strings.npy", mmap_mode="r")
        if len(self._rows) != n or len(offs) != SNAP_STRINGS * n + 1:
            raise ValueError(f"{snap}: damaged snapshot")
        self.keys, self.paths, self.content_keys = (_Strings(blob, offs, i, n) for i in range(3))
        self.loc = _Loc(_Strings(blob, offs, 3, n), self._rows)
        self.pixels = np.asarray(self._rows[:, 3])
        self.nbytes = np.asarray(self._rows[:, 4])
        if meta["search"] == "flat":
            self.index = CopyIndex(np.asarray(self.vectors))
        else:
            self.index = CopyIndex(None, search=VectorSearch.load(snap / "search.faiss", meta["search"]))
        self._flipped = self._windows = None

    def _gather(self, which: int, shape: tuple, dtype, rows: np.ndarray | None = None) -> np.ndarray:
        """Array ``which`` of the parts (0 descriptors, 1 mirror images', 2 windows') for ``rows`` (an
        index row per output row, -1 for zeros; default every row), read from the parts straight into
        the result (no whole-index copy in between: the windows are 5 KB an image)."""
        rows = np.arange(len(self.keys)) if rows is None else np.asarray(rows, np.int64)
        out = np.zeros((len(rows), *shape), dtype)
        ok = np.flatnonzero(rows >= 0)
        part = np.asarray(self._rows[:, 5])[rows[ok]]
        vrow = np.asarray(self._rows[:, 6])[rows[ok]]
        for i, pid in enumerate(self.parts):
            sel = np.flatnonzero(part == i)
            if len(sel):
                out[ok[sel]] = _arrays(self.folder, pid)[which][vrow[sel]]
        return out

    def rows_of(self, which: str, rows: np.ndarray) -> np.ndarray:
        """``vectors``, ``flipped`` or ``windows`` of the index rows ``rows`` (-1: zeros), gathered
        from the parts without holding the whole index's copy (``curate`` at a million images)."""
        if which == "windows":
            return self._gather(2, (len(WINDOWS), SIDE * SIDE), np.float16, rows)
        return self._gather(0 if which == "vectors" else 1, (SIDE * SIDE,), np.float32, rows)

    @property
    def vectors(self) -> np.ndarray:  # type: ignore[override]
        if self._vectors is None:  # an approximate search holds them: read from the parts when asked
            self._vectors = self._gather(0, (SIDE * SIDE,), np.float32)
        return self._vectors

    @property
    def flipped(self) -> np.ndarray:  # type: ignore[override]
        if self._flipped is None:
            self._flipped = self._gather(1, (SIDE * SIDE,), np.float32)
        return self._flipped

    @property
    def windows(self) -> np.ndarray:  # type: ignore[override]
        if self._windows is None:
            self._windows = self._gather(2, (len(WINDOWS), SIDE * SIDE), np.float16)
        return self._windows


def open_index(spec: str | Collection, index: str | Path = "") -> StoredIndex | None:
    """The checked index of a pile, or None when it has none (``IndexMismatch`` when it does not match).
    A pile given by name is answered from its snapshot when nothing changed since the last full check
    (``QuickIndex``, below), and a full check that passes keeps a new snapshot."""
    if isinstance(spec, str):
        quick = _open_snapshot(spec, index)
        if quick is not None:
            return quick
        since = time.time_ns()
        stored = _open_checked(open_collection(spec), index)
        if stored is not None:
            _write_snapshot(stored, spec, since)
        return stored
    return _open_checked(spec, index)


def _open_checked(coll: Collection, index: str | Path = "") -> StoredIndex | None:
    """``open_index``'s full check: the pile listed now against every row of the index."""
    try:
        folder = index_folder(coll, index)
    except IndexMismatch:
        if index:
            raise
        return None  # in memory or pipe: shards: no index, the caller scans
    doc = _load_manifest(folder)
    if doc is None:
        if index:
            raise IndexMismatch(f"{folder} holds no pile index (build one with `openseer index PILE --index {index}`)")
        return None
    if doc.get("descriptor") != DESCRIPTOR_VERSION:
        raise IndexMismatch(f"the index {folder} holds descriptors of version {doc.get('descriptor')}; this "
                            f"openseer uses {DESCRIPTOR_VERSION}: rebuild it with `openseer index {coll.spec}`")
    return StoredIndex(coll, folder, doc)


def ensure_index(spec: str, index: str | Path = "", progress: bool = False, log=print) -> StoredIndex:
    """The index of a pile, built or brought up to date first where it is missing or stale."""
    try:
        found = open_index(spec, index)
    except IndexMismatch:
        found = None
    if found is None:
        build_index(spec, index, progress=progress, log=log)
        found = open_index(spec, index)
    assert found is not None
    return found
