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
