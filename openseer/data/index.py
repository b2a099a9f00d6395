"""The persistent index of a pile: near-copy descriptors computed once per image, stored beside it.

``openseer index PILE`` describes every image of a folder, a file list or local tar shards
(data/nearcopy.py ``describe_pile_image``: the whole image, its mirror image and a few crop
windows) and stores the result in ``ROOT/.openseer-index/`` (``ROOT``: the folder, the list's
folder, the shards' folder; ``--index DIR`` puts it elsewhere)::

    index.json            format, descriptor version, the parts and what each covers
    parts/NNNNNN.json     one row per image: source, identity, key, content key, size, status, ...
    parts/NNNNNN.npy      descriptors of its described rows (float32, N x 256)
    parts/NNNNNN.flip.npy the mirror images' descriptors; parts/NNNNNN.win.npy the windows' (float16)
    parts/NNNNNN.fine.npy the verification descriptors (32 x 32 high-pass, float16): a takedown
                          verifies its candidates from these, without decoding them
    parts/NNNNNN.pxSIDE.bin/.npy   the decode cache (optional): small copies of the part's images
                          at SIDE and their offsets (``make_copy``; ``build_index(pixels=SIDE)``)
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
descriptor version: an index that no longer matches its pile is never used. A takedown verifies
its candidates from their stored verification descriptors and reads again only the copies it
confirms (a file, or a shard sample at its recorded offset), checked against their content keys: it
decodes nothing of the pile.

``openseer shard`` writes each shard's part as it writes the shard (``describe_sample`` in its
workers, ``add_shard_part``): the files this build would write.

The decode cache (``data.decode_cache``; ``prepare_decode_cache`` before ``pretrain`` and ``distill``
train, ``openseer index PILE --pixels SIDE``) lives in the same parts under the same rule: copies are
made with the descriptors from one decode, added to kept parts that lack them, carried over when a
part is rewritten, and removed (the part rewritten under a new id) when the deny-list names their
image. ``open_pixels`` gives the loader a ``collection.PixelRows``, which uses a copy only while its
original's size and modification time are the recorded ones.
"""

from __future__ import annotations

import hashlib
import io
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
from .collection import Collection, FileCollection, PixelRows, ShardCollection, open_collection
from .decode import BadImage, DataError, Decoding, decode_bytes, is_dicom, open_bytes, read_bytes
from .denylist import DenyList, content_key
from .nearcopy import (
    DESCRIPTOR_VERSION,
    FINE,
    READ_SIDE,
    SIDE,
    VERIFY,
    WINDOWS,
    CopyIndex,
    CopyQueries,
    Query,
    confirm,
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


DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # kept at 16 bits in a copy (PNG)
GREY_MODES = ("L", "LA", "La", "1")  # 8-bit grey: a grey JPEG copy
COPY_QUALITY = 95  # JPEG quality of an 8-bit copy


def make_copy(data: bytes, where: str, side: int, described: Image.Image | None = None) -> bytes | None:
    """The decode cache's copy of one image's bytes: decoded as the loader decodes it (EXIF applied,
    alpha composited on white, CMYK and palettes to RGB), its longer side brought down to ``side``,
    kept at its depth: 8-bit colour as RGB JPEG and 8-bit grey as grey JPEG (quality 95), 16-bit and
    deeper grey as a 16-bit PNG of the values scaled as ``decode.to_grey`` scales them (so both an RGB
    and a 1-channel reader get what they get from the original, up to rounding). None when the
    original is read instead: a DICOM file (its window is a run setting), an image no larger than
    ``side``. ``described``: the image the descriptor was made from, reused when it is large enough.
    ``BadImage`` for bytes that do not decode."""
    if is_dicom(data):
        return None
    head = open_bytes(data, where)
    w, h = head.size
    if max(w, h) <= side:
        return None
    buf = io.BytesIO()
    if head.mode in DEEP_MODES:
        img = decode_bytes(data, where, decoding=Decoding(1))  # F in [0, 1] at full depth (EXIF applied)
        img = _shrink(img, side)
        arr = np.clip(np.asarray(img, np.float32) * 65535.0 + 0.5, 0, 65535).astype(np.uint16)
        Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
        return buf.getvalue()
    if described is not None and described.mode == "RGB" and max(described.size) >= side:
        img = described
    else:
        s = next((s for s in (8, 4, 2) if max(w, h) // s >= side), 1)  # JPEG: DCT-scaled, no smaller than side
        img = decode_bytes(data, where, min_pixels=(w // s) * (h // s) if s > 1 else None)
    img = _shrink(img, side)
    if head.mode in GREY_MODES:
        img = img.convert("L")
    img.save(buf, format="JPEG", quality=COPY_QUALITY)
    return buf.getvalue()


def _shrink(img: Image.Image, side: int) -> Image.Image:
    """``img`` with its longer side brought down to ``side`` (Lanczos, after a box pre-reduction)."""
    f = side / max(img.size)
    if f >= 1:
        return img
    size = (max(1, round(img.width * f)), max(1, round(img.height * f)))
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _describe_image(data: bytes, where: str) -> tuple[dict, tuple | None, Image.Image | None]:
    """Row fields and descriptors of one image's bytes (status says why there are none), and the
    decoded image they were made from."""
    row = {"content_key": content_key(data), "bytes": len(data), "width": 0, "height": 0, "status": ""}
    try:
        img = decode_bytes(data, where, draft_size=READ_SIDE)  # as the near-copy scan decodes it
        head = img if is_dicom(data) else open_bytes(data, where)  # full size (a JPEG may be draft-reduced)
        row["width"], row["height"] = int(head.width), int(head.height)
    except BadImage as e:
        row["status"] = e.reason
        return row, None, None
    d = describe_pile_image(img)
    if d is None:
        row["status"] = "flat"
    return row, d, img


def _describe_bytes(data: bytes, where: str) -> tuple[dict, tuple | None]:
    """Row fields and descriptors of one image's bytes (status says why there are none)."""
    row, d, _ = _describe_image(data, where)
    return row, d


def _describe_with_copy(data: bytes, where: str, side: int, deny: DenyList | None,
                        key: str) -> tuple[dict, tuple | None, bytes | None]:
    """``_describe_bytes`` and the image's decode-cache copy at ``side`` from the same decode (none
    for an image ``deny`` takes down, by ``key`` or content key: a taken-down image gets no new copy)."""
    row, d, img = _describe_image(data, where)
    px = None
    if img is not None and not _denied(deny, key, row["content_key"]):
        try:
            px = make_copy(data, where, side, img)
        except BadImage:
            px = None
    return row, d, px


def _denied(deny: DenyList | None, key: str, ckey: str) -> bool:
    return deny is not None and bool(deny.keys) and (deny.denies(key) or deny.denies(ckey))


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

    def __init__(self, sides: tuple[int, ...] = ()) -> None:
        self.cols: dict[str, list] = {c: [] for c in COLUMNS}
        self.vecs: list[np.ndarray] = []
        self.flips: list[np.ndarray] = []
        self.wins: list[np.ndarray] = []
        self.fines: list[np.ndarray] = []
        self.copies: dict[int, list[bytes | None]] = {s: [] for s in sides}  # decode-cache copies per side

    def add(self, row: dict, d: tuple | None, copies: dict[int, bytes | None] | None = None) -> None:
        for s, lst in self.copies.items():
            lst.append((copies or {}).get(s))
        row = dict(row)
        row["vec"] = -1
        if d is not None:
            row["vec"] = len(self.vecs)
            self.vecs.append(d[0])
            self.flips.append(d[1])
            self.wins.append(d[2].astype(np.float16))
            self.fines.append(np.asarray(d[3], np.float16))
        for c in COLUMNS:
            self.cols[c].append(row.get(c, -1 if c in ("position", "offset", "length") else ""))

    def write(self, folder: Path, pid: str) -> None:
        parts = folder / "parts"
        parts.mkdir(parents=True, exist_ok=True)
        n = len(self.vecs)
        arrays = {"npy": (np.stack(self.vecs) if n else np.zeros((0, SIDE * SIDE), np.float32)),
                  "flip.npy": (np.stack(self.flips) if n else np.zeros((0, SIDE * SIDE), np.float32)),
                  "win.npy": (np.stack(self.wins) if n else np.zeros((0, len(WINDOWS), SIDE * SIDE), np.float16)),
                  "fine.npy": (np.stack(self.fines) if n else np.zeros((0, FINE * FINE), np.float16))}
        for ext, a in arrays.items():
            tmp = parts / f".{pid}.{ext}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                np.save(f, a)
            os.replace(tmp, parts / f"{pid}.{ext}")
        for side, copies in self.copies.items():
            write_copies(folder, pid, side, copies)
        atomic_write_json(parts / f"{pid}.json", self.cols)  # last: marks the part done

    def pixels(self) -> dict[str, int]:
        """The manifest's record of this part's copies: side -> copies stored."""
        return {str(s): sum(c is not None for c in lst) for s, lst in self.copies.items()}

    def __len__(self) -> int:
        return len(self.cols["source"])


def write_copies(folder: Path, pid: str, side: int, copies: list[bytes | None]) -> None:
    """A part's decode-cache copies at ``side``: ``NNNNNN.pxSIDE.bin`` (the encoded copies one after
    another) and ``NNNNNN.pxSIDE.npy`` (offset and length per row, -1 for a row without a copy),
    each written whole and renamed into place."""
    parts = folder / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    where = np.full((len(copies), 2), -1, np.int64)
    tmp = parts / f".{pid}.px{side}.bin.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        at = 0
        for i, c in enumerate(copies):
            if c is not None:
                f.write(c)
                where[i] = (at, len(c))
                at += len(c)
    os.replace(tmp, parts / f"{pid}.px{side}.bin")
    tmp = parts / f".{pid}.px{side}.npy.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.save(f, where)
    os.replace(tmp, parts / f"{pid}.px{side}.npy")


def read_copies(folder: Path, pid: str, side: int) -> tuple[Path, np.ndarray]:
    """(store file, offset and length per row) of a part's copies at ``side``."""
    p = folder / "parts"
    try:
        return p / f"{pid}.px{side}.bin", np.load(p / f"{pid}.px{side}.npy")
    except (OSError, ValueError) as e:
        raise IndexMismatch(f"the decode cache in {folder} is damaged: part {pid}: {e}; rebuild it with "
                            f"`openseer index PILE --pixels {side} --rebuild`") from None


def _read_part(folder: Path, pid: str) -> dict[str, list]:
    try:
        return json.loads((folder / "parts" / f"{pid}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise IndexMismatch(f"the pile index {folder} is damaged: part {pid}: {e}; rebuild it with "
                            f"`openseer index PILE --rebuild`") from None


def _remove_part(folder: Path, pid: str) -> None:
    for ext in ("json", "npy", "flip.npy", "win.npy", "fine.npy"):
        (folder / "parts" / f"{pid}.{ext}").unlink(missing_ok=True)
    for p in (folder / "parts").glob(f"{pid}.px*"):
        p.unlink(missing_ok=True)


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


def build_index(spec: str | Collection, index: str | Path = "", rebuild: bool = False, progress: bool = True,
                log=print, workers: int = 0, ranks=None, files_per_part: int = 0, pixels: int = 0,
                snapshot: bool = True) -> dict:
    """Build or extend the index of the pile ``spec`` (see the module docstring); returns counts:
    images described now, kept from before, dropped, the folder, the seconds taken. ``pixels``: also
    keep each image's decode-cache copy at that side (``make_copy``; folders and lists), made for the
    rows described now and added to the parts kept that lack them (``copied``: copies made now,
    ``stored``: copies the index holds at that side). ``workers``:
    processes reading and describing files (folders and lists; 0: in this process);
    ``files_per_part``: files in one part (0: ``FILES_PER_PART``; smaller parts resume and spread
    over ranks more finely); ``snapshot``: then check the index against the pile and keep the
    snapshot a takedown opens (``QuickIndex``; a pile given by name).

    ``ranks`` (``use.ranks.Ranks`` under torchrun; default one process): rank 0 prepares the index
    folder (manifest, stale rows dropped) and plans the parts to describe, each with its id; the
    k-th part goes to rank k mod N, which writes its files; after every round of N parts rank 0
    adds them to the manifest in plan order. So N ranks write the same index as one process, and an
    interrupted build keeps the rounds it finished."""
    from ..progress import progress as bar

    ranks = ranks or OneProcess()
    t0 = time.perf_counter()
    coll = open_collection(spec) if isinstance(spec, str) else spec
    deny, coll.deny = coll.deny, DenyList()  # every image is indexed, also deny-listed ones (check --near reports which are)
    try:
        if pixels and not isinstance(coll, FileCollection):
            raise IndexMismatch(f"{coll.spec}: --pixels (the decode cache) is for a folder or a file list; tar shards "
                                f"are read as a stream (write them downscaled: `openseer shard --max-side N`)")
        folder = index_folder(coll, index)
        doc, plan, stats = ranks.on_main(_prepare, coll, folder, rebuild, log, files_per_part or FILES_PER_PART, pixels,
                                         deny)
        root = _root(folder)
        extra = sum(int(t["rows"]) for t in plan if t["kind"] == "pixels")
        with bar("index", total=coll.n + extra, unit="img", enabled=progress and ranks.is_main) as p:
            p.update(stats["kept"])
            for start in range(0, len(plan), ranks.world):
                k = start + ranks.rank
                done = (_describe_part(coll, folder, root, plan[k], workers, pixels, deny, k)
                        if k < len(plan) else None)
                finished = [d for d in ranks.gather(done) if d is not None]
                ranks.on_main(_commit, folder, doc, finished, stats)
                p.update(sum(d["rows"] for d in finished))
    finally:
        coll.deny = deny
    seconds = time.perf_counter() - t0
    parts = ranks.on_main(lambda: _load_manifest(folder)["parts"])
    stats = ranks.on_main(lambda: stats)
    done_now = stats["decoded"]
    if snapshot and isinstance(spec, str):  # (the decode cache's build for training skips it)
        ranks.on_main(_keep_snapshot, spec, index)
    return {"folder": str(folder), "described": stats["described"], "kept": stats["kept"],
            "dropped": stats["dropped"], "rows": sum(int(x["rows"]) for x in parts), "statuses": dict(stats["statuses"]),
            "seconds": round(seconds, 2), "images_per_s": round(done_now / seconds, 1) if seconds else 0.0,
            "copied": stats["copied"], "decoded": stats["decoded"], "purged": stats["purged"], "side": pixels,
            "stored": sum(int(x.get("pixels", {}).get(str(pixels), 0)) for x in parts) if pixels else 0}


def _keep_snapshot(spec: str, index: str | Path) -> None:
    """Check the index just built against its pile and keep the snapshot takedowns open (its approximate
    search structure included: built here once, not on the first takedown)."""
    time.sleep(RACY_NS / 1e9)  # the manifest was just written: a snapshot taken now would not trust it
    try:
        open_index(spec, index)
    except DataError:
        pass  # the pile changed during the build: the next open names what


def _prepare(coll: Collection, folder: Path, rebuild: bool, log, per_part: int,
             side: int = 0, deny: DenyList | None = None) -> tuple[dict, list[dict], dict]:
    """(manifest, plan, counts) of a build: the index folder made or reset, stale rows dropped; the
    plan lists the parts to describe, each with its id (a shard, or up to FILES_PER_PART files), then
    (``side``) the kept parts that lack their decode-cache copies at that side."""
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
    sides = {x["id"]: x.get("pixels", {}) for x in doc["parts"]}
    for p in (folder / "parts").glob("*") if (folder / "parts").is_dir() else []:
        pid, _, ext = p.name.partition(".")
        if pid not in sides or (ext.startswith("px") and ext.split(".")[0][2:] not in sides[pid]):
            p.unlink(missing_ok=True)  # a part (or copies) an interrupted build (or rank) did not finish
    root = _root(folder)
    stats: dict = {"described": 0, "kept": 0, "dropped": 0, "copied": 0, "decoded": 0, "purged": 0,
                   "statuses": Counter()}
    if isinstance(coll, ShardCollection):
        plan = _plan_shards(coll, root, doc, stats)
    else:
        plan = _plan_files(coll, folder, root, doc, stats, per_part, deny)
    for task in plan:
        task["id"] = _next_id(doc)
    if side:
        plan += [{"kind": "pixels", "id": x["id"], "side": side, "rows": int(x["rows"])} for x in doc["parts"]
                 if x["kind"] == "files" and str(side) not in x.get("pixels", {})]
    return doc, plan, stats


def _next_id(doc: dict) -> str:
    pid = f"{int(doc.get('next', 0)):06d}"
    doc["next"] = int(doc.get("next", 0)) + 1
    return pid


def _commit(folder: Path, doc: dict, finished: list[dict], stats: dict) -> None:
    """Add described parts to the manifest (rank 0), in plan order; a shard's new part replaces its old
    one; a kept part's new decode-cache copies are recorded in its entry."""
    for d in sorted(finished, key=lambda d: d["order"]):
        stats["copied"] += d["copied"]
        stats["decoded"] += d["decoded"]
        if d["info"] is None:  # copies added to a kept part
            info = next(x for x in doc["parts"] if x["id"] == d["pixels_of"])
            info.setdefault("pixels", {})[str(d["side"])] = d["stored"]
            continue
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
    return {"info": info, "replaces": replaces, "statuses": dict(Counter(s or "described" for s in part.cols["status"])),
            "rows": len(part), "copied": sum(part.pixels().values()), "decoded": len(part)}


def _in_workers(ds, workers: int):
    """``ds``'s items in order, made by ``workers`` loader processes (0: here)."""
    if workers and len(ds) > 1:
        import torch

        return iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=min(workers, len(ds)),
                                                shuffle=False, collate_fn=_as_is, prefetch_factor=16))
    return (ds[i] for i in range(len(ds)))


def _describe_part(coll: Collection, folder: Path, root: Path, task: dict, workers: int, side: int = 0,
                   deny: DenyList | None = None, order: int = 0) -> dict:
    """Describe one planned part and write its files (any rank); what rank 0 adds to the manifest."""
    if task["kind"] == "shard":
        done = _describe_shard(coll, folder, task)  # type: ignore[arg-type]
    elif task["kind"] == "pixels":
        done = _copy_part(folder, root, task, workers, deny, getattr(coll, "read_timeout", None))
    else:
        entries = [coll.entries[j] for j in task["rows"]]  # type: ignore[attr-defined]
        ds = _DescribeFiles(entries, [_source(e.path, root) for e in entries], coll.read_timeout,  # type: ignore[attr-defined]
                            side, deny)
        part = _Part((side,) if side else ())
        for row, d, px in _in_workers(ds, workers):
            part.add(row, d, {side: px})
        part.write(folder, task["id"])
        info = {"id": task["id"], "kind": "files", "rows": len(part), "described": len(part.vecs)}
        if side:
            info["pixels"] = part.pixels()
        done = _part_done(info, part)
    done["order"] = order
    return done


def _copy_part(folder: Path, root: Path, task: dict, workers: int, deny: DenyList | None,
               read_timeout: float | None) -> dict:
    """Decode-cache copies at ``task['side']`` for a kept part (any rank): each row's file read again,
    used only while it is the file the row describes (size, time and content key)."""
    side, pid = task["side"], task["id"]
    cols = _read_part(folder, pid)
    todo = []
    for i, src in enumerate(cols["source"]):
        big = max(int(cols["width"][i] or 0), int(cols["height"][i] or 0)) > side
        ok = cols["status"][i] in ("", "flat") and big and not _denied(deny, cols["name"][i], cols["content_key"][i])
        todo.append((_source_path(src, root), cols["size"][i], cols["mtime_ns"][i], cols["content_key"][i])
                    if ok else None)
    copies = list(_in_workers(_CopyFiles(todo, side, read_timeout), workers))
    write_copies(folder, pid, side, copies)
    stored = sum(c is not None for c in copies)
    return {"info": None, "pixels_of": pid, "side": side, "stored": stored, "copied": stored,
            "rows": len(copies), "statuses": {}, "decoded": sum(t is not None for t in todo)}


class _CopyFiles:
    """Files to copy for the decode cache (a map-style dataset, like ``_DescribeFiles``)."""

    def __init__(self, todo: list, side: int, read_timeout: float | None):
        self.todo, self.side, self.read_timeout = todo, side, read_timeout

    def __len__(self) -> int:
        return len(self.todo)

    def __getitem__(self, i: int) -> bytes | None:
        if self.todo[i] is None:
            return None
        path, size, mtime, ckey = self.todo[i]
        try:
            data = read_bytes(path, self.read_timeout)
            if _identity(path) != (size, mtime) or content_key(data) != ckey:
                return None  # changed since it was described: the next build describes it again
            return make_copy(data, path, self.side)
        except BadImage:
            return None


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

    def __init__(self, entries: list, srcs: list[str], read_timeout: float, side: int = 0,
                 deny: DenyList | None = None):
        self.entries, self.srcs, self.read_timeout = entries, srcs, read_timeout
        self.side, self.deny = side, deny

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int):
        e = self.entries[i]
        size, mtime = _identity(e.path)
        base = {"source": self.srcs[i], "size": size, "mtime_ns": mtime, "name": e.key}
        try:
            data = read_bytes(e.path, self.read_timeout)
        except BadImage as err:
            return {**base, "status": err.reason}, None, None
        if self.side and e.frame < 0:  # (a DICOM frame row: its file is read as itself)
            row, d, px = _describe_with_copy(data, name_to_text(e.path), self.side, self.deny, e.key)
        else:
            (row, d), px = _describe_bytes(data, name_to_text(e.path)), None
        return {**base, **row}, d, px


def _plan_files(coll: FileCollection, folder: Path, root: Path, doc: dict, stats: dict,
                per_part: int, deny: DenyList | None = None) -> list[dict]:
    """Drop the index rows of changed or vanished files, and the decode-cache copies of images
    ``deny`` names; plan the listed files not indexed as they are."""
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
    for info in [x for x in doc["parts"] if x["kind"] == "files" and x.get("pixels") and deny and deny.keys]:
        cols = _read_part(folder, info["id"])  # copies of images taken down since they were made: removed
        denied = {i for i, (k, c) in enumerate(zip(cols["name"], cols["content_key"])) if _denied(deny, k, c)}
        held = {i for s in info["pixels"] for i in denied if read_copies(folder, info["id"], int(s))[1][i][1] >= 0}
        if held:
            _rewrite_without(folder, info, set(), doc, held)
            stats["purged"] += len(held)
    _save_manifest(folder, doc)
    stats["kept"] += len(have)
    todo = [j for j, src in enumerate(srcs) if src not in have]
    return [{"kind": "files", "rows": todo[i:i + per_part]} for i in range(0, len(todo), per_part)]


def _as_is(sample):
    """A loader's sample unchanged (no conversion of numpy arrays to tensors)."""
    return sample


def _rewrite_without(folder: Path, info: dict, rows: set[int], doc: dict, no_copies: set[int] = frozenset()) -> None:
    """Part ``info`` without ``rows`` (its descriptors too) and without the decode-cache copies of
    ``no_copies``, written under a new id (a run reading the old copies finds them gone, never moved)."""
    cols = _read_part(folder, info["id"])
    arrs = _arrays(folder, info["id"])
    sides = tuple(int(s) for s in info.get("pixels", {}))
    stores = {s: read_copies(folder, info["id"], s) for s in sides}
    blobs = {s: stores[s][0].read_bytes() for s in sides}
    part = _Part(sides)
    for i in range(len(cols["source"])):
        if i in rows:
            continue
        v = cols["vec"][i]
        row = {c: cols[c][i] for c in COLUMNS}
        copies = {s: (blobs[s][int(o):int(o) + int(n)] if n >= 0 and i not in no_copies else None)
                  for s in sides for o, n in [stores[s][1][i]]}
        part.add(row, None if v < 0 else tuple(a[v] for a in arrs), copies)
    doc["parts"].remove(info)
    if len(part):
        pid = _next_id(doc)
        part.write(folder, pid)
        new = {**info, "id": pid, "rows": len(part), "described": len(part.vecs)}
        if sides:
            new["pixels"] = part.pixels()
        doc["parts"].append(new)
    _save_manifest(folder, doc)
    _remove_part(folder, info["id"])


def _arrays(folder: Path, pid: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A part's stored arrays (memory-mapped): descriptors, mirror images', windows', verification's."""
    p = folder / "parts"
    try:
        return tuple(np.load(p / f"{pid}.{ext}", mmap_mode="r")  # type: ignore[return-value]
                     for ext in ("npy", "flip.npy", "win.npy", "fine.npy"))
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
        self.pixels = np.asarray(pixels, np.int64)
        self.nbytes = np.asarray(nbytes, np.int64)
        # where each row is stored: its part (a number into ``parts``) and its row there
        self.parts = list(dict.fromkeys(pid for pid, _ in vec_rows))
        number = {pid: i for i, pid in enumerate(self.parts)}
        self._where = np.array([(number[pid], v) for pid, v in vec_rows], np.int64).reshape(-1, 2)
        self._vectors = self._gather(0, (SIDE * SIDE,), np.float32)
        self._flipped = self._windows = None  # read from the parts when asked (5 KB an image: curate only)
        self.index = CopyIndex(self._vectors)

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

    def _gather(self, which: int, shape: tuple, dtype, rows: np.ndarray | None = None) -> np.ndarray:
        """Array ``which`` of the parts (0 descriptors, 1 mirror images', 2 windows', 3 verification's)
        for ``rows`` (an index row per output row, -1 for zeros; default every row), read from the
        parts straight into the result (no whole-index copy in between: the windows are 5 KB an image)."""
        rows = np.arange(len(self.keys)) if rows is None else np.asarray(rows, np.int64)
        out = np.zeros((len(rows), *shape), dtype)
        ok = np.flatnonzero(rows >= 0)
        part, vrow = self._where[rows[ok], 0], self._where[rows[ok], 1]
        for i in np.unique(part).tolist():
            sel = np.flatnonzero(part == i)
            out[ok[sel]] = _arrays(self.folder, self.parts[i])[which][vrow[sel]]
        return out

    def targets(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The stored verification descriptors and descriptors of index rows ``rows``."""
        rows = np.asarray(rows, np.int64)
        vecs = (np.asarray(self._vectors[rows], np.float32) if self._vectors is not None
                else self._gather(0, (SIDE * SIDE,), np.float32, rows))
        return self._gather(3, (FINE * FINE,), np.float16, rows).astype(np.float32), vecs

    def rows_of(self, which: str, rows: np.ndarray) -> np.ndarray:
        """``vectors``, ``flipped`` or ``windows`` of the index rows ``rows`` (-1: zeros), gathered
        from the parts without holding the whole index's copy (``curate`` at a million images)."""
        if which == "windows":
            return self._gather(2, (len(WINDOWS), SIDE * SIDE), np.float16, rows)
        return self._gather(0 if which == "vectors" else 1, (SIDE * SIDE,), np.float32, rows)

    @property
    def vectors(self) -> np.ndarray:
        if self._vectors is None:  # an approximate search holds them: read from the parts when asked
            self._vectors = self._gather(0, (SIDE * SIDE,), np.float32)
        return self._vectors

    @property
    def flipped(self) -> np.ndarray:
        if self._flipped is None:
            self._flipped = self._gather(1, (SIDE * SIDE,), np.float32)
        return self._flipped

    @property
    def windows(self) -> np.ndarray:
        if self._windows is None:
            self._windows = self._gather(2, (len(WINDOWS), SIDE * SIDE), np.float16)
        return self._windows

    def _verify(self, query: Query, cands: dict, verify: float = VERIFY) -> list[tuple[int, float, float]]:
        """The candidates that verify, from their stored targets (none decoded); each copy found is
        read again and kept only while it is the file that was described (its content key)."""
        rows = list(cands)
        fines, vecs = self.targets(np.asarray(rows, np.int64)) if rows else (None, None)
        return [t for t in confirm(query, cands, rows, fines, vecs, verify) if self._read(t[0]) is not None]

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
        parts = list(stored.parts) if n else []
        rows = np.zeros((n, 7), np.int64)
        for r, (_file, off, length, pos) in enumerate(stored.loc):
            rows[r, :3] = off, length, pos
        rows[:, 3], rows[:, 4] = stored.pixels, stored.nbytes
        rows[:, 5:7] = stored._where
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
        self._where = np.asarray(self._rows[:, 5:7])  # part number and row there, per index row


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


# ---------------------------------------------------------------- the decode cache (pretrain, distill)


def open_pixels(coll: FileCollection, side: int, index: str | Path = "") -> PixelRows:
    """The decode cache of ``coll`` at ``side`` as ``PixelRows`` (rows in the pile's order), from the
    index's parts that hold copies at that side; a row whose file is not in them (not indexed yet,
    no copy: small, DICOM, unreadable) has none and is read as itself. Each copy is used only while
    its original's size and modification time are those recorded (``PixelRows.read``)."""
    folder = index_folder(coll, index)
    doc = _load_manifest(folder) or _new_manifest()
    root = _root(folder)
    stores: list[str] = []
    found: dict[str, tuple[int, int, int, int, int, str]] = {}
    for info in doc["parts"]:
        if info["kind"] != "files" or str(side) not in info.get("pixels", {}):
            continue
        cols = _read_part(folder, info["id"])
        store, where = read_copies(folder, info["id"], side)
        stores.append(os.fspath(store))
        for i, src in enumerate(cols["source"]):
            if where[i][1] >= 0:
                found[src] = (len(stores) - 1, int(where[i][0]), int(where[i][1]), int(cols["size"][i]),
                              int(cols["mtime_ns"][i]), cols["content_key"][i])
    none = (-1, -1, -1, -1, -1, "")
    rows = [found.get(_source(e.path, root), none) if e.frame < 0 else none for e in coll.entries]
    cols_ = list(zip(*rows)) if rows else [[]] * 6
    arr = [np.asarray(c, dtype=np.int64) for c in cols_[:5]]
    return PixelRows(side, stores, *arr, content_keys=list(cols_[5]))


def decode_cache_side(cfg) -> int:
    """The side of the decode cache's copies: ``data.decode_cache_side``, or (0) the longer side at
    which a 16:9 photo still holds the pixels the multi-crop needs without upsampling (the
    reduced-size decode's ``decode.reduced_decode_pixels``), rounded up to a multiple of 32 and at
    least the largest crop: 640 for SEER's 160 + 96-px crops (a 5120 x 2880 photo becomes the
    640 x 360 the loader decodes it at anyway), 448 for photos-cpu, 96 for tiny-cpu."""
    if cfg.data.decode_cache_side:
        return int(cfg.data.decode_cache_side)
    from .decode import reduced_decode_pixels

    need = reduced_decode_pixels(cfg.crops.sizes, cfg.crops.min_scale)
    side = int(np.ceil(np.sqrt(need * 16 / 9) / 32) * 32)
    return max(side, int(max(cfg.crops.sizes)))


SIZE_SAMPLE = 16  # files whose headers decide decode_cache=auto


def larger_than(coll: FileCollection, side: int) -> bool:
    """Whether a sample of the pile's files (up to ``SIZE_SAMPLE``, spread over the listing; headers
    only, deny-list applied) holds an image with a side larger than ``side``."""
    n = len(coll)
    for i in sorted({round(j * (n - 1) / max(SIZE_SAMPLE - 1, 1)) for j in range(min(SIZE_SAMPLE, n))}):
        try:
            data = coll.read(i)
            if not is_dicom(data) and max(open_bytes(data, coll.key(i)).size) > side:
                return True
        except BadImage:
            continue
    return False


class DistRanks:
    """The rank split of a build inside a training run under torchrun: the run's own process group
    (``build_index``'s ``ranks``, as ``use.ranks.Ranks``)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world, self.is_main = rank, world, rank == 0

    def on_main(self, fn, *args):
        import torch.distributed as dist

        box: list = [None, None]
        dist.barrier()
        if self.is_main:
            try:
                box[0] = fn(*args)
            except Exception as e:  # every rank raises it
                box[1] = e
        dist.broadcast_object_list(box, src=0)
        if box[1] is not None:
            raise box[1]
        return box[0]

    def gather(self, value) -> list:
        import torch.distributed as dist

        out: list = [None] * self.world
        dist.all_gather_object(out, value)
        return out


def prepare_decode_cache(cfg, source: Collection, rank: int = 0, world: int = 1, command: str = "pretrain",
                         progress: bool = True):
    """``data.decode_cache`` for a run about to train on ``source``: (the config, with ``decode_cache``
    resolved to on and ``decode_cache_side`` to the side used when the cache is used, else as given;
    the note to print or '').

    on (or auto, for a folder or file list holding images larger than the side): the pile's index
    is built or extended with copies at that side (``build_index``: only what is new or changed is
    decoded; under torchrun the ranks share the parts) and attached to ``source`` (its ``pixels``),
    so the loader decodes the small copies instead of the originals. off, and auto for tar shards,
    Fashion-MNIST or a pile of small images: nothing. auto with an index folder that cannot be
    written: off, said in the note; on: ``IndexMismatch``."""
    import copy as _copy

    mode = cfg.data.decode_cache
    side = decode_cache_side(cfg)
    files = isinstance(source, FileCollection) and source.base is not None
    if mode == "off" or (mode == "auto" and not files):
        return cfg, ""
    if not files:
        return cfg, (f"data.decode_cache=on: {source.spec} is {source.kind} read as it is stored, not a folder "
                     f"or a file list; no decode cache")
    if mode == "auto":
        big = DistRanks(rank, world).on_main(larger_than, source, side) if world > 1 else larger_than(source, side)
        if not big:
            return cfg, ""
    ranks = DistRanks(rank, world) if world > 1 else None
    try:
        r = build_index(source, progress=progress and rank == 0, log=(lambda t: None), ranks=ranks, pixels=side,
                        workers=cfg.data.num_workers, snapshot=False)  # the loader's processes make the first pass
    except (IndexMismatch, OSError) as e:  # e.g. a read-only folder
        why = str(e) if isinstance(e, IndexMismatch) else f"cannot write the pile index: {e}"
        if mode == "on":
            raise IndexMismatch(f"data.decode_cache=on: {why}; set data.decode_cache=off, or make the pile's "
                                f"folder writable") from None
        return cfg, f"data.decode_cache=auto: no decode cache ({why}); the originals are decoded every epoch"
    source.pixels = open_pixels(source, side)  # type: ignore[attr-defined]
    cfg = _copy.deepcopy(cfg)
    cfg.data.decode_cache, cfg.data.decode_cache_side = "on", side
    rate = f", {r['images_per_s']:g} img/s" if r["decoded"] else ""
    note = (f"decode cache: {source.pixels.stored} of {len(source)} images read from copies of at most {side} px "
            f"in {r['folder']} (decoded now {r['decoded']}, reused {r['kept']}{rate}); the rest "
            f"are small enough, or unreadable, and read as they are"
            + (f"; {r['purged']} copies of images on the deny-list removed" if r["purged"] else ""))
    return cfg, note
