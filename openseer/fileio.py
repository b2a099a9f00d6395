"""Small file helpers shared by the stages that write run state."""

from __future__ import annotations

import json
import os
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader, or a kill at any moment, sees the old file or the new
    one whole: the text goes to a hidden file beside it (UTF-8), is synced, and is renamed over it. On
    an error the hidden file is removed and the error raised."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, value) -> None:
    """``value`` as indented JSON, written with ``atomic_write_text``."""
    atomic_write_text(path, json.dumps(value, indent=1))


def usual_mode(path: str | Path) -> None:
    """Give a written file the umask's usual mode: safetensors writes files readable by their owner only."""
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(path, 0o666 & ~umask)
    except OSError:
        pass


# ---------------------------------------------------------------- file names in record files
#
# A file name is whatever bytes the OS allows (Python holds undecodable bytes as surrogate escapes,
# os.fsdecode). Index files, lists, CSVs and JSON hold text, so names are written as *name text*:
# UTF-8, with a backslash escape for the backslash itself, control characters (newline, tab, ...)
# and every byte that is not UTF-8. ``text_to_name(name_to_text(n)) == n`` for every name, and the
# text is one line that CSV, JSON and a terminal all carry unchanged; ordinary names are unchanged.

_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNESCAPES = {"\\": "\\", "n": "\n", "r": "\r", "t": "\t"}


def name_to_text(name: str | os.PathLike) -> str:
    """A file name (or path) as one line of printable text that ``text_to_name`` turns back into it."""
    out = []
    for ch in os.fsdecode(name):
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, held as a surrogate escape
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        else:
            out.append(ch)
    return "".join(out)


def text_to_name(text: str) -> str:
    """The file name that ``name_to_text`` wrote as ``text`` (a backslash not starting an escape is kept)."""
    if "\\" not in text:
        return text
    out = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt in _UNESCAPES:
                out.append(_UNESCAPES[nxt])
                i += 2
                continue
            if nxt == "x" and _is_hex(text[i + 2:i + 4]):
                byte = int(text[i + 2:i + 4], 16)
                out.append(chr(byte) if byte < 0x80 else chr(0xDC00 + byte))
                i += 4
                continue
        out.append(ch)
        i += 1
    return "".join(out)


def _is_hex(s: str) -> bool:
    return len(s) == 2 and all(c in "0123456789abcdefABCDEF" for c in s)


LIST_HEADER = "# openseer file list v1: one path per line, written with name escapes (\\n, \\\\, \\xHH)"


def write_list(path: str | Path, names: list[str]) -> None:
    """A file list (one path per line) that ``read_list`` reads back exactly, whatever the names hold.

    The first line marks the escaped form; a name starting with '#' or blank space is escaped so
    that it cannot read as a comment or a blank line."""
    lines = [LIST_HEADER]
    for n in names:
        text = name_to_text(n)
        if text[:1] in ("#", " ") or not text.strip():
            text = f"\\x{ord(text[0]):02x}{text[1:]}" if text else text
        lines.append(text)
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_list(path: str | Path) -> list[str]:
    """Paths of a file list: one written by ``write_list`` (escaped), or a plain one a person wrote
    (one path per line as raw bytes, blank lines and '#' comments ignored, a trailing CR dropped)."""
    raw = Path(path).read_bytes()
    if b"\0" in raw:
        raise ValueError(f"{path} is not a text file list of paths (it holds NUL bytes)")
    lines = os.fsdecode(raw).split("\n")
    escaped = lines[0].rstrip("\r") == LIST_HEADER
    out = []
    for line in lines[1:] if escaped else lines:
        line = line[:-1] if line.endswith("\r") else line
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        out.append(text_to_name(line) if escaped else line)
    return out


def csv_text(rows: list[list], header: list[str] | None = None) -> str:
    """CSV text (``\\n`` line ends) of rows; write file names through ``name_to_text`` first."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if header:
        w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def read_csv_rows(path: str | Path) -> list[list[str]]:
    """All rows of a CSV file (UTF-8; bytes that are not UTF-8 kept as surrogate escapes)."""
    import csv

    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.reader(f))
