"""A hostile collection: every kind of awkward file and file name a crawl or an old archive holds.

``write_hostile(root)`` writes two class folders ``root/a`` and ``root/b`` (so ``eval`` can read it
as labelled data too) holding tests/data/corpus.py's corpus plus the kinds below, and returns a
``Hostile`` with the name text (``fileio.name_to_text``) of every file that must be used, and the
skip count by reason every command must report. Every good file has distinct bytes (no duplicate
for ``shard`` to drop).
"""

from __future__ import annotations

import io
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from openseer.fileio import name_to_text
from tests.data.corpus import corpus_bytes

RNG = np.random.default_rng(2026)


def _enc(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(w: int = 40, h: int = 30, mode: str = "RGB") -> Image.Image:
    arr = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def _gif_animated() -> bytes:
    frames = [_noise(20, 20).convert("P") for _ in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def _extra_good() -> dict[str, bytes]:
    """Kinds beyond corpus.py's: formats, extension case, names (relative paths; bytes)."""
    rgb16 = np.asarray(RNG.integers(0, 65535, (8, 8)), dtype=np.uint16)
    pal_alpha = _noise(12, 12).convert("P")
    return {
        "static.gif": _enc(_noise(16, 16).convert("P"), "GIF"),
        "animated.gif": _gif_animated(),
        "UPPER.JPG": _enc(_noise(), "JPEG", quality=90),
        "Mixed.Png": _enc(_noise(), "PNG"),
        "long-ext.jpeg": _enc(_noise(), "JPEG", quality=85),
        "jpeg_named.png": _enc(_noise(), "JPEG", quality=80),  # content decides, not the name
        "gif_named.jpg": _enc(_noise(14, 14).convert("P"), "GIF"),
        "portable.ppm": _enc(_noise(), "PPM"),
        "palette_alpha.png": _enc(pal_alpha, "PNG", transparency=3),
        "gray16_raw.png": _enc(Image.fromarray(rgb16), "PNG"),
        "comma,and \"quotes\".png": _enc(_noise(), "PNG"),
        "#hash-first.png": _enc(_noise(), "PNG"),
        " leading space.png": _enc(_noise(), "PNG"),
        "back\\slash.png": _enc(_noise(), "PNG"),
        "tab\there.png": _enc(_noise(), "PNG"),
        "--flag-like.jpg": _enc(_noise(), "JPEG", quality=90),
        ("L" * 240) + ".png": _enc(_noise(), "PNG"),  # near the 255-byte name limit
        "dir.jpg/inside.png": _enc(_noise(), "PNG"),  # a folder named like an image is a folder
        "deep/er/nested.webp": _enc(_noise(), "WEBP"),
        "scan16.tif": _enc(Image.fromarray(np.asarray(RNG.integers(0, 65535, (9, 7)), dtype=np.uint16)), "TIFF"),
        "scan16.pgm": _enc(Image.fromarray(np.asarray(RNG.integers(0, 65535, (7, 9)), dtype=np.uint16)), "PPM"),
        **_dicoms(),
    }


def _dicom_bytes(name: str, pixels: np.ndarray, **kw) -> bytes:
    import tempfile

    from tests.data.dicoms import write_dicom

    with tempfile.TemporaryDirectory() as tmp:
        return write_dicom(Path(tmp) / name, pixels, **kw).read_bytes()


def _dicoms() -> dict[str, bytes]:
    """DICOM files that must be read: pydicom's bundled CT, and ones written here (signed 12-bit CT
    with a rescale and a multi-valued window, MONOCHROME1, three frames, a .DICOM name)."""
    from tests.data.dicoms import bundled

    ct = np.asarray(RNG.integers(-1000, 2000, (20, 24)), dtype=np.int16)
    return {
        "ct_small.dcm": bundled("CT_small.dcm").read_bytes(),
        "ct12.dcm": _dicom_bytes("ct12.dcm", ct, slope=1.0, intercept=-1024.0, window=((40, 400), (400, 1500)),
                                 bits_stored=12),
        "mono1.dcm": _dicom_bytes("mono1.dcm", RNG.integers(0, 4096, (16, 16)).astype(np.uint16),
                                  photometric="MONOCHROME1", bits_stored=12),
        "frames.dcm": _dicom_bytes("frames.dcm", RNG.integers(0, 60000, (3, 10, 12)).astype(np.uint16)),
        "UPPER.DICOM": _dicom_bytes("u.dcm", RNG.integers(0, 255, (8, 8)).astype(np.uint8)),
    }


def _extra_bad() -> dict[str, tuple[bytes, str]]:
    """DICOM files that must be skipped, each with its reason."""
    from pydicom.uid import JPEGLSLossless

    from tests.data.dicoms import bundled

    return {
        "jpegls_bundled.dcm": (bundled("MR_small_jpeg_ls_lossless.dcm").read_bytes(), "no_decoder"),
        "jpegls_written.dcm": (_dicom_bytes("j.dcm", np.zeros((8, 8), np.uint16), syntax=JPEGLSLossless,
                                            encapsulated=b"\xff\xd8\xff\xf7 not decoded"), "no_decoder"),
        "plan_no_pixels.dcm": (bundled("rtplan.dcm").read_bytes(), "not_an_image"),
        "cut_short.dcm": (bundled("MR_small.dcm").read_bytes()[:-500], "truncated"),
    }


@dataclass
class Hostile:
    root: Path
    good: set[str] = field(default_factory=set)  # name text relative to root, each used once
    skips: Counter = field(default_factory=Counter)  # reason -> count, what every command must report
    kinds: int = 0

    @property
    def n_files(self) -> int:
        return len(self.good) + sum(self.skips.values())


def write_hostile(root: Path) -> Hostile:
    """Write the collection (a/ and b/ class folders); see the module doc."""
    out = Hostile(root)
    bad, good = corpus_bytes()
    regular: dict[str, tuple[bytes, str]] = {}
    for name, (data, reason) in bad.items():
        regular[name] = (data, reason)
    for name, (data, _) in good.items():
        regular[name] = (data, "")
    for name, data in _extra_good().items():
        regular[name] = (data, "")
    regular.update(_extra_bad())
    for i, (name, (data, reason)) in enumerate(sorted(regular.items())):
        rel = os.path.join("ab"[i % 2], name)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if reason:
            out.skips[reason] += 1
        else:
            out.good.add(name_to_text(rel))
    a, b = root / "a", root / "b"
    # a name that is not UTF-8, in both class folders (distinct content)
    for folder in (a, b):
        raw = os.fsencode(str(folder)) + b"/latin1_\xe9t\xe9_\xff.png"
        with open(raw, "wb") as f:
            f.write(_enc(_noise(), "PNG"))
        out.good.add(name_to_text(os.path.relpath(os.fsdecode(raw), root)))
    # a bad file whose name has a newline and a byte that is not UTF-8 (its skip is recorded as text)
    with open(os.fsencode(str(b)) + b"/cut\nshort_\xfe.jpg", "wb") as f:
        f.write(_enc(_noise(), "JPEG", quality=90)[:300])
    out.skips["truncated"] += 1
    # special files
    os.mkfifo(a / "fifo.jpg")
    out.skips["not_a_file"] += 1
    os.symlink(a / "does-not-exist.jpg", b / "dangling_link.jpg")
    os.symlink(a / "loop.png", a / "loop.png")
    out.skips["unreadable"] += 2
    os.symlink("..", b / "up_loop")  # a folder symlink pointing up: not followed, no endless walk
    with open(b / "huge_sparse.jpg", "wb") as f:
        from openseer.data.decode import MAX_FILE_BYTES

        f.truncate(MAX_FILE_BYTES + 1)
    out.skips["too_large"] += 1
    (a / "new\nline name.txt").write_text("not an image name: not listed at all")
    locked = b / "no_permission.png"
    locked.write_bytes(_enc(_noise(), "PNG"))
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads it anyway (permission bits do not bind root): it is a good file
        out.good.add(name_to_text(locked.relative_to(root)))
    else:
        out.skips["unreadable"] += 1
    # a good image on the deny-list beside the collection (every reader applies ROOT/takedowns.txt)
    (a / "taken_down.png").write_bytes(_enc(_noise(), "PNG"))
    (root / "takedowns.txt").write_text("a/taken_down.png\t2026-01-01T00:00:00Z\ttest\n")
    out.skips["denied"] += 1
    out.kinds = len(regular) + 3 + 7  # regular kinds, the non-UTF-8 names, fifo/dangling/loop/up-loop/sparse/locked/denied
    return out
