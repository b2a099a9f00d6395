"""Takedowns and audit: a versioned deny-list honoured at read time, run provenance, "who saw it".

Deny-list (a text file, append-only by convention; ``openseer takedown add`` writes it)::

    # comment lines start with '#'
    <key>\t<added-utc>\t<note>

A key is a **content key** (the first 32 hex digits of the SHA-256 of the original image bytes,
what ``openseer shard`` uses as the sample key; a full 64-digit SHA-256 is shortened to that) or
any other manifest/sample key. Its **version** is a hash of the keys in file order, so
appending changes it and a run can record exactly which list it applied. The stream reader drops
a sample when its key or the content key of its stored bytes is listed: shards are never
rewritten, and a deny-listed image never reaches a batch again (also on resume of an older run:
the list is re-read at every start).

Provenance: every run that reads tar shards writes ``RUN_DIR/data_provenance.json`` with the
source spec, the expanded shard list and each shard's size in bytes (a shard that changed since
is named by ``takedown check``), the shard index and manifest it found, the stream layout
(seed, ranks, loader slots, shuffle buffer) and, per start or resume, the step and the deny-list
version in force. A folder or file-list run also records, at its first start, the listing it
reads: its keys in the run's order, gzip'd in ``RUN_DIR/data_listing.txt.gz`` (about 10 bytes a
file), with their count and SHA-256 in the provenance (``folder.listing``). Past
``LISTING_KEYS_MAX`` files only the count and digest are kept (the digest still detects a
change). A resume that finds another listing is marked (``listing.changed_on_resume``).

"Saw" (``openseer takedown check``): a checkpoint at step S *saw* an image when the image's
sample was delivered in a training batch of a step < S, i.e. the weights in that checkpoint were
updated with it. It is computed from the stream positions saved in the checkpoint (per loader
slot: pass, shard, sample position and the keys still waiting in the shuffle buffer), so samples a
worker had read ahead but not yet handed to training do not count. When the image was deny-listed
at some point during the run, the answer is conservative: it counts as seen if it was read.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import ConfigError
from ..rundir import CONFIG, META, checkpoint_step, list_checkpoints, load_run_config, read_bad_images
from .batches import MAX_BAD_IN_A_ROW, epoch_permutation, steps_per_epoch
from .collection import open_collection
from .decode import BadImage, DataError, read_bytes
from .denylist import (  # noqa: F401  (the deny-list's names, re-exported for callers of this module)
    KEY_HEX,
    PROVENANCE,
    DenyList,
    TakedownError,
    add_to_denylist,
    content_key,
    list_version,
    normalise_key,
    read_entries,
    record_provenance,
)
from .stream import scan_shard_keys, slot_shards

# ---------------------------------------------------------------- audit: which runs saw an image


@dataclass
class Sighting:
    """One run's answer for one image."""

    run: str
    shard: str = ""  # the shard holding the image ('' when the run did not list it)
    position: int = -1  # sample position inside that shard
    checkpoints: dict[str, bool] = field(default_factory=dict)  # checkpoint file -> saw it
    note: str = ""
    unsure: bool = False  # the pile changed since the run, or the run recorded no listing: see ``note``

    @property
    def read(self) -> bool:
        return bool(self.shard)


# ---------------------------------------------------------------- the listing a folder run read

LISTING = "data_listing.txt.gz"  # RUN_DIR/LISTING: the keys a folder/list run read, in its order
LISTING_KEYS_MAX = 5_000_000  # beyond this (about 50 MB gzip'd) only the count and digest are kept


def listing_digest(keys: list[str]) -> str:
    """SHA-256 of the keys in order, one a line: what detects a changed listing."""
    h = hashlib.sha256()
    for k in keys:
        h.update(k.encode("utf-8", "backslashreplace") + b"\n")
    return h.hexdigest()


def folder_provenance(run_dir: str | Path, coll) -> dict:
    """``coll.provenance()`` of a folder/list collection plus the listing the run reads
    (``folder.listing``: count, digest, the gzip'd key file), recorded at its first start and kept
    on resume (a resume on another listing is marked ``changed_on_resume``)."""
    info = coll.provenance()
    keys = [e.key for e in coll.entries]
    now = {"count": len(keys), "sha256": listing_digest(keys), "file": ""}
    run_dir = Path(run_dir)
    before: dict = {}
    try:
        before = (json.loads((run_dir / PROVENANCE).read_text()).get("folder") or {}).get("listing") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        before = {}
    if before.get("sha256"):  # a resume: the first start's listing stays the record
        listing = dict(before)
        if before["sha256"] != now["sha256"]:
            listing["changed_on_resume"] = True
    else:
        listing = now
        if len(keys) <= LISTING_KEYS_MAX:
            tmp = run_dir / (LISTING + ".tmp")
            with gzip.open(tmp, "wt", encoding="utf-8", newline="\n") as f:
                f.writelines(k + "\n" for k in keys)
            os.replace(tmp, run_dir / LISTING)
            listing["file"] = LISTING
    info["folder"]["listing"] = listing
    return info


def _recorded_keys(run: Path, listing: dict) -> list[str] | None:
    """The keys the run recorded (None when it kept only a digest, or the file is gone or altered)."""
    if not listing.get("file"):
        return None
    try:
        with gzip.open(run / listing["file"], "rt", encoding="utf-8", newline="\n") as f:
            keys = f.read().split("\n")[:-1]
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    return keys if listing_digest(keys) == listing.get("sha256") else None


def find_runs(root: str | Path) -> list[Path]:
    """Run directories with a provenance record: ``root`` itself and folders up to 3 levels below."""
    root = Path(root)
    found = []
    for depth in range(0, 4):
        pattern = "/".join(["*"] * depth + [PROVENANCE])
        found += [p.parent for p in root.glob(pattern) if p.is_file()]
    return sorted(set(found))


def _locate(key: str, record: dict) -> tuple[str, int, str]:
    """(shard url, position in shard, note) of ``key`` among the run's shards; '' when absent."""
    urls: list[str] = record.get("shards", [])
    manifest = (record.get("manifest") or {}).get("path")
    if manifest and Path(manifest).is_file():
        hit = _manifest_lookup(Path(manifest), key)
        if hit is None:
            return "", -1, f"not in the manifest {manifest}"
        shard_name, position = hit
        for url in urls:
            if url == shard_name or Path(url).name == Path(shard_name).name:
                return url, position, ""
        return "", -1, f"in shard {shard_name}, which this run did not read"
    notes = []
    for url in urls:  # no manifest: look inside the run's shards (local files only)
        if url.startswith("pipe:"):
            notes.append("pipe: shards cannot be searched without a manifest")
            continue
        keys = scan_shard_keys(url)
        if key in keys:
            return url, keys.index(key), ""
    return "", -1, "; ".join(sorted(set(notes))) or "not in any shard this run read"


def _changed_shards(record: dict) -> list[str]:
    """The run's local shards whose size differs from the one recorded at its start (or are gone);
    [] for a run that recorded no sizes (older openseer)."""
    sizes = record.get("shard_bytes") or []
    out = []
    for url, size in zip(record.get("shards", []), sizes):
        if url.startswith("pipe:") or size < 0:
            continue
        try:
            now = Path(url).stat().st_size
        except OSError:
            now = -1
        if now != size:
            out.append(url)
    return out


def _manifest_lookup(path: Path, key: str) -> tuple[str, int] | None:
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        for row in csv.DictReader(f):
            if row.get("key") == key or row.get("sha256", "")[:KEY_HEX] == key:
                return row.get("shard", ""), int(row.get("position", -1) or -1)
    return None


def _data_state(checkpoint: Path) -> dict | None:
    import torch

    try:
        if checkpoint.is_dir():  # a sharded (.dcp) checkpoint: the data state is in meta.pt
            state = torch.load(checkpoint / META, map_location="cpu", weights_only=True)
        else:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    return state.get("data") if isinstance(state, dict) else None


def saw_sample(data_state: dict, url_index: int, position: int) -> bool:
    """Whether the stream positions in a checkpoint's data state had delivered sample
    (shard ``url_index``, ``position``) to training, in any pass so far.

    After a change of world size (``stream.redeal``) the state also holds the one before it
    (``before``), the first pass of the new layout, and what each new slot was dealt: pieces of
    shards and the old slots' buffered samples.
    """
    if data_state.get("before") and saw_sample(data_state["before"], url_index, position):
        return True
    layout = data_state["layout"]
    n_urls, seed = layout["n_urls"], layout["seed"]
    per_rank = layout["slots_per_rank"]
    n_slots = layout["world_size"] * per_rank
    first_pass = int(layout.get("first_pass", 0))
    me = [url_index, position]
    for rank, slots in enumerate(data_state["ranks"]):
        for local, st in enumerate(slots or []):
            if not st:
                continue
            slot = rank * per_rank + local
            waiting = [list(b) for b in st["buffer"]].count(me)
            if "dealt" in layout:
                read = _reads_since_redeal(layout, slot, st, url_index, position)
                if read and ("extra" not in st or read > waiting):
                    return True  # the drain is over (all it read was delivered), or a copy has left the buffer
            if "extra" in st:
                continue  # still draining: the new layout's passes have not begun
            for p in range(first_pass, int(st["pass"]) + 1):
                mine = slot_shards(n_urls, seed, p, slot, n_slots)
                if url_index not in mine:
                    continue
                c = mine.index(url_index)
                if p < st["pass"]:
                    return True  # a finished pass delivered every sample of it
                read_now = c < st["shard"] or (c == st["shard"] and position < st["pos"])
                if read_now and not waiting:
                    return True
    return False


def _reads_since_redeal(layout: dict, slot: int, st: dict, url_index: int, position: int) -> int:
    """How many copies of sample (url_index, position) a slot took in from what ``redeal`` gave it:
    the old slots' buffered samples, and the pieces it has read (``st['extra']`` is what is left of
    them: a suffix, its first piece possibly begun; all of them once the drain is over)."""
    me = [url_index, position]
    copies = [list(b) for b in layout["dealt_buffer"][slot]].count(me)
    pieces = layout["dealt"][slot]
    left = st.get("extra", [])
    done = len(pieces) - len(left) if "extra" in st else len(pieces)
    for i, (u, start) in enumerate(pieces):
        if u == url_index and position >= start:
            copies += i < done or (i == done and bool(left) and position < left[0][1])
    return copies


def _denied_from_start(key: str, record: dict) -> bool:
    """Whether ``key`` was on the deny-list the run applied from its first start (the list is
    append-only: its first N keys must still hash to the version recorded then)."""
    sessions = record.get("sessions", [])
    first = sessions[0].get("denylist", {}) if sessions else {}
    if not first.get("path") or not first.get("entries"):
        return False
    try:
        current = DenyList.load(first["path"])
    except TakedownError:
        return False
    n = int(first["entries"])
    return list_version(current.keys[:n]) == first.get("version") and key in current.keys[:n]


def _folder_sighting(run: Path, record: dict, key: str, read_timeout: float | None = None) -> Sighting:
    """A folder run: find the file by content key among the files the run listed, then replay the
    run's deterministic order.

    The files are the run's recorded listing (``folder.listing``): a file added since is not among
    them. The batch of step t holds the files at positions [t*B, (t+1)*B) of epoch e's seeded
    permutation (data/batches.py); a file whose predecessors in index order were unreadable may
    stand in for them (``bad_images.txt`` of the run says which were). A checkpoint at step S saw
    the file when one of those slots fell in a step < S. Where the listing cannot be known (an older
    run recorded none; a huge one kept only its digest and the folder changed since) the answer
    says it cannot tell for sure, and why.
    """
    folder = Path(record["folder"]["path"])
    try:
        cfg = load_run_config(run)
    except (ConfigError, OSError) as e:
        return Sighting(str(run), note=f"cannot read {run / CONFIG}: {e}")
    try:  # listed and read as the run read it (bounded reads; unreadable files are not it)
        coll = open_collection(str(folder), read_timeout=read_timeout, shards=False)
    except DataError:
        coll = None
    current = coll.entries if coll is not None else []
    listing = record["folder"].get("listing") or {}
    recorded = _recorded_keys(run, listing)
    now_keys = [e.key for e in current]
    caveat, unsure = "", False
    if recorded is not None:  # the run's own listing: exact, whatever the folder holds today
        by_key = {e.key: e for e in current}
        entries = [by_key.get(k) for k in recorded]
        if listing.get("changed_on_resume"):
            caveat, unsure = ("cannot tell for sure: the folder's listing changed when the run was resumed; "
                              "answered from the listing of its first start"), True
        elif listing_digest(now_keys) != listing.get("sha256"):
            gone = sum(e is None for e in entries)
            caveat = (f"the folder changed since the run (it listed {len(recorded)} files, {len(now_keys)} now"
                      + (f", {gone} of its files gone" if gone else "") + "): answered from the run's recorded listing")
    elif listing.get("sha256"):  # a digest only: today's listing is the run's when the digest matches
        entries = list(current)
        if listing_digest(now_keys) != listing["sha256"] or listing.get("changed_on_resume"):
            return Sighting(str(run), unsure=True, note=(
                f"cannot tell for sure: the folder changed since the run (it listed {listing.get('count')} files, "
                f"{len(now_keys)} now) and the run kept only a digest of its listing "
                + (f"({run / listing['file']} is missing or altered)" if listing.get("file")
                   else f"(over {LISTING_KEYS_MAX} files)")))
    else:  # an older run: no listing recorded
        entries = list(current)
        then = record["folder"].get("files")
        if then is not None and int(then) != len(now_keys):
            return Sighting(str(run), unsure=True, note=(
                f"cannot tell for sure: the run recorded no listing of {folder} (an older openseer) and the "
                f"folder changed since (it listed {then} files, {len(now_keys)} now)"))
        caveat, unsure = (f"cannot tell for sure: the run recorded no listing of {folder} (an older openseer); "
                          "answered by replaying its order over today's listing, which may differ"), True
    if cfg.data.limit:
        entries = entries[:cfg.data.limit]
    hit = None
    for i in range(len(entries)):
        e = entries[i]
        if e is None:
            continue
        try:
            data = read_bytes(e.path, coll.read_timeout)  # type: ignore[union-attr]
        except BadImage:
            continue
        if content_key(data) == key:
            hit = i
            break
    files = entries
    keys = recorded if recorded is not None else now_keys
    if hit is None:
        where = "the run listed in" if recorded is not None else "now under"
        note = f"not among the {len(files)} files {where} {folder}"
        return Sighting(str(run), note=f"{note}; {caveat}" if caveat else note, unsure=unsure)
    rel = lambda i: keys[i]  # noqa: E731
    s = Sighting(str(run), shard=str(folder), position=hit, unsure=unsure)
    bad = {key for _, key in read_bad_images(run)}
    if _denied_from_start(key, record) or _denied_from_start(rel(hit), record):
        for ckpt in list_checkpoints(run):
            s.checkpoints[ckpt.name] = False
        s.note = "deny-listed before the run started: filtered at read time, never delivered"
        return s
    slots = [hit]  # index slots that deliver this file: itself, and unreadable predecessors it replaced
    j = hit - 1
    while j >= 0 and hit - j < MAX_BAD_IN_A_ROW and rel(j) in bad:
        slots.append(j)
        j -= 1
    n, gb = len(files), cfg.data.batch_size
    spe = steps_per_epoch(n, gb)
    ckpts = list_checkpoints(run)
    last = max((checkpoint_step(c) for c in ckpts), default=0)
    first = None
    for epoch in range(0, last // spe + 1):
        inverse = np.empty(n, dtype=np.int64)
        inverse[np.asarray(epoch_permutation(n, cfg.seed, epoch))] = np.arange(n)
        steps = [epoch * spe + int(inverse[k]) // gb for k in slots if inverse[k] < spe * gb]
        if steps:
            first = min(steps)
            break
    for ckpt in ckpts:
        s.checkpoints[ckpt.name] = first is not None and first < checkpoint_step(ckpt)
    versions = {sess["denylist"]["version"] for sess in record.get("sessions", [])}
    if len(versions) > 1:
        s.note = "the deny-list changed during the run: 'saw' counts every read (conservative)"
    if caveat:
        s.note = f"{s.note}; {caveat}" if s.note else caveat
    return s


def check_image(target: str, runs_root: str | Path, read_timeout: float | None = None) -> tuple[str, list[Sighting]]:
    """The content key of ``target`` (an image file, or a key/hash) and what every run under
    ``runs_root`` did with it."""
    p = Path(target)
    if p.is_file():
        try:
            key = content_key(read_bytes(p, read_timeout))
        except BadImage as e:
            raise TakedownError(f"cannot read image {target}: {e}") from None
    else:
        key = normalise_key(target) or ""
        if not key:
            raise TakedownError(f"{target!r} is neither an image file nor a key")
    runs = find_runs(runs_root)
    if not runs:
        raise TakedownError(f"no run under {runs_root} has a {PROVENANCE} (runs that read tar shards or folders write one)")
    out = []
    for run in runs:
        try:
            record = json.loads((run / PROVENANCE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            out.append(Sighting(str(run), note=f"unreadable {PROVENANCE}: {e}"))
            continue
        if isinstance(record.get("folder"), dict):
            out.append(_folder_sighting(run, record, key, read_timeout))
            continue
        url, position, note = _locate(key, record)
        s = Sighting(str(run), shard=url, position=position, note=note)
        changed = _changed_shards(record)
        if changed:  # shards are never rewritten by openseer: one that was cannot be answered for
            s.unsure = True
            s.note = (f"{s.note}; " if s.note else "") + (
                f"cannot tell for sure: {len(changed)} shard(s) changed size since the run read them "
                f"({', '.join(Path(u).name for u in changed[:3])}{', ...' if len(changed) > 3 else ''})")
        if url:
            index = record["shards"].index(url)
            for ckpt in list_checkpoints(run):
                state = _data_state(ckpt)
                if state is None:
                    s.checkpoints[ckpt.name] = False
                    s.note = f"{ckpt.name} has no stream positions"
                    continue
                s.checkpoints[ckpt.name] = saw_sample(state, index, position)
            if _denied_from_start(key, record):
                s.checkpoints = dict.fromkeys(s.checkpoints, False)
                s.note = "deny-listed before the run started: filtered at read time, never delivered"
            else:
                versions = {sess["denylist"]["version"] for sess in record.get("sessions", [])}
                if len(versions) > 1:
                    s.note = "the deny-list changed during the run: 'saw' counts every read (conservative)"
        out.append(s)
    return key, out
