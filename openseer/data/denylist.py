"""The deny-list and run provenance: what every reader applies, below the audit in takedown.py.

Deny-list (a text file, append-only by convention; ``openseer takedown add`` writes it)::

    # comment lines start with '#'
    <key>\t<added-utc>\t<note>

A key is a **content key** (the first 32 hex digits of the SHA-256 of the original image bytes,
what ``openseer shard`` uses as the sample key; a full 64-digit SHA-256 is shortened to that) or
any other manifest/sample key (for folders: the file's path relative to the folder, as name text).
Its **version** is a hash of the keys in file order, so appending changes it and a run can record
exactly which list it applied.

Provenance: ``RUN_DIR/data_provenance.json`` records the source, what was read and, per start or
resume, the step and the deny-list version in force.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import OpenseerError
from ..fileio import atomic_write_json, atomic_write_text
from ..rundir import PROVENANCE  # noqa: F401  (the run directory names its files; re-exported)

KEY_HEX = 32  # content keys: the first 128 bits of SHA-256
_HEX = re.compile(r"^[0-9a-f]+$")


class TakedownError(OpenseerError, ValueError):
    """A deny-list or audit problem, with what and where."""


def content_key(data: bytes) -> str:
    """The content key of encoded image bytes: the first 32 hex digits of their SHA-256."""
    return hashlib.sha256(data).hexdigest()[:KEY_HEX]


def normalise_key(token: str) -> str | None:
    """A deny-list entry from one token: full SHA-256 -> content key; other keys kept; '' -> None."""
    token = token.strip()
    if not token or token.startswith("#"):
        return None
    low = token.lower()
    if _HEX.match(low) and len(low) in (KEY_HEX, 64):
        return low[:KEY_HEX]
    return token


def list_version(keys: list[str]) -> str:
    """Version of a deny-list: a hash of its keys in order ('empty' for none)."""
    if not keys:
        return "empty"
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


@dataclass
class DenyList:
    """The keys of a deny-list file, in file order, with a set for lookups."""

    path: str = ""
    keys: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._set = set(self.keys)

    @classmethod
    def load(cls, path: str | Path | None) -> DenyList:
        """Read a deny-list; a path that does not exist (yet) is an empty list."""
        if not path:
            return cls()
        p = Path(path)
        if not p.exists():
            return cls(str(p))
        try:
            text = p.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise TakedownError(f"cannot read deny-list {p}: {e.strerror or e}") from None
        keys, seen = [], set()
        for line in text.splitlines():
            key = normalise_key(line.split("\t")[0].split(" ")[0]) if line.strip() else None
            if key and key not in seen:
                seen.add(key)
                keys.append(key)
        return cls(str(p), keys)

    @property
    def version(self) -> str:
        return list_version(self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: str) -> bool:
        return key in self._set

    def denies(self, key: str, data: bytes | None = None) -> bool:
        """Whether a sample (its key and, when given, its stored bytes) is taken down."""
        if not self._set:
            return False
        if key in self._set or key.rsplit("/", 1)[-1] in self._set:
            return True
        return data is not None and content_key(data) in self._set

    def describe(self) -> dict:
        return {"path": self.path, "version": self.version, "entries": len(self.keys)}


def read_entries(path: str | Path) -> list[str]:
    """Keys from a user's file of hashes or keys (one per line; '#' comments, extra columns ignored)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise TakedownError(f"cannot read {p}: {e.strerror or e}") from None
    out = []
    for line in text.splitlines():
        fields = re.split(r"[\s,]+", line.strip())
        key = normalise_key(fields[0]) if fields else None
        if key:
            out.append(key)
    return out


def add_to_denylist(list_path: str | Path, keys: list[str], note: str = "") -> tuple[int, DenyList]:
    """Append new keys (already-listed ones are skipped) atomically; returns (added, new list)."""
    list_path = Path(list_path)
    current = DenyList.load(list_path)
    normalised = [n for n in (normalise_key(k) for k in keys) if n]
    new = [k for k in dict.fromkeys(normalised) if k not in current]
    if not new:
        return 0, current
    old_text = list_path.read_text(encoding="utf-8", errors="replace") if list_path.exists() else (
        "# openseer deny-list: one content key (first 32 hex of the image's SHA-256) or manifest key per line.\n"
        "# Append only: the list's version is a hash of its keys in order.\n")
    if old_text and not old_text.endswith("\n"):
        old_text += "\n"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    clean_note = re.sub(r"[\t\r\n]+", " ", note)
    lines = "".join(f"{k}\t{stamp}\t{clean_note}\n" for k in new)
    list_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write_text(list_path, old_text + lines)
    except OSError as e:
        raise TakedownError(f"cannot write deny-list {list_path}: {e.strerror or e}") from None
    return len(new), DenyList.load(list_path)


# ---------------------------------------------------------------- provenance


def record_provenance(run_dir: str | Path, info: dict, start_step: int, denylist: DenyList) -> dict:
    """Create or extend ``RUN_DIR/data_provenance.json`` with this (re)start; returns the record."""
    path = Path(run_dir) / PROVENANCE
    record: dict = {}
    if path.is_file():
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            record = {}
    sessions = [s for s in record.get("sessions", []) if int(s.get("start_step", -1)) < start_step]
    record = {"format": "openseer.provenance.v1", **info, "sessions": sessions}
    record["sessions"].append({
        "start_step": int(start_step),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "denylist": denylist.describe(),
    })
    atomic_write_json(path, record)
    return record
