"""A generated corpus of malformed and unusual image files, with what each must become.

``BAD``: file name -> the ``BadImage`` reason it must be skipped with. ``GOOD``: file name -> a
check of the decoded RGB image. ``write_corpus(folder)`` writes both (files, a FIFO, symlinks) and
``corpus_bytes()`` gives the regular ones as bytes (for tar shards).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

RNG = np.random.default_rng(1234)


def _enc(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(w: int = 48, h: int = 32) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_with_header(width: int, height: int, bit_depth: int = 1, colour: int = 0) -> bytes:
    """A PNG whose IHDR claims width x height, with a tiny valid-looking IDAT and IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def _jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """Patch the SOF0/SOF2 frame header of a JPEG to claim another size."""
    out = bytearray(data)
    i = 2
    while i < len(out) - 9:
        if out[i] == 0xFF and out[i + 1] in (0xC0, 0xC1, 0xC2):
            out[i + 5:i + 7] = struct.pack(">H", height)
            out[i + 7:i + 9] = struct.pack(">H", width)
            return bytes(out)
        seg = struct.unpack(">H", out[i + 2:i + 4])[0]
        i += 2 + seg
    raise AssertionError("no SOF marker")


def _halves(w: int = 40, h: int = 20) -> Image.Image:
    """Left half red, right half blue (to check orientation)."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (255, 0, 0)
    arr[:, w // 2:] = (0, 0, 255)
    return Image.fromarray(arr)


def _bad_bytes() -> dict[str, tuple[bytes, str]]:
    jpg = _enc(_noise(), "JPEG", quality=90)
    png = _enc(_noise(), "PNG")
    corrupt_png = bytearray(png)
    corrupt_png[len(png) // 2] ^= 0xFF  # inside IDAT; IEND still there
    garbage_jpg = jpg[:200] + RNG.integers(0, 256, 3000, dtype=np.uint8).tobytes().replace(b"\xff", b"\x00") + b"\xff\xd9"
    return {
        "zero.jpg": (b"", "empty"),
        "truncated.jpg": (jpg[: len(jpg) // 2], "truncated"),
        "truncated.png": (png[: len(png) // 2], "truncated"),
        "cut_in_header.png": (png[:20], "truncated"),
        "bad_crc_data.png": (bytes(corrupt_png), "corrupt"),
        "garbage_scan.jpg": (garbage_jpg, "corrupt"),
        "page.html.jpg": (b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n", "not_an_image"),
        "notes.png": (b"just some text that was saved with an image extension\n", "not_an_image"),
        "random.jpg": (RNG.integers(0, 256, 4096, dtype=np.uint8).tobytes().replace(b"\xff\xd8", b"\x00\x00"),
                       "not_an_image"),
        "bomb.png": (_png_with_header(30000, 30000), "too_many_pixels"),
        "bomb.jpg": (_jpeg_with_size(jpg, 60000, 60000), "too_many_pixels"),
        "zero_width.png": (_png_with_header(0, 10), "corrupt"),
    }


def _check_rgb(expect_size: tuple[int, int] | None = None, pixel: tuple[tuple[int, int], tuple[int, int, int], int] | None = None):
    def check(img: Image.Image) -> None:
        assert img.mode == "RGB"
        if expect_size:
            assert img.size == expect_size, img.size
        if pixel:
            (x, y), rgb, tol = pixel
            got = img.getpixel((x, y))
            assert all(abs(a - b) <= tol for a, b in zip(got, rgb)), (got, rgb)
    return check


def _good_bytes() -> dict[str, tuple[bytes, Callable[[Image.Image], None]]]:
    out: dict[str, tuple[bytes, Callable]] = {}
    # EXIF orientation 6 (rotate 90 CW to display): a 40x20 red|blue image shows as 20x40 red-on-top
    exif = Image.Exif()
    exif[0x0112] = 6
    out["exif_rotated.jpg"] = (_enc(_halves(), "JPEG", quality=95, exif=exif.tobytes()),
                               _check_rgb((20, 40), ((10, 5), (255, 0, 0), 40)))
    # a broken EXIF block must not cost the image
    good = _enc(_halves(), "JPEG", quality=95)
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 6 + 10) + b"Exif\x00\x00" + b"MM\x00*\xff\xff\xff\xff\x00\x01"
    out["broken_exif.jpg"] = (good[:2] + app1 + good[2:], _check_rgb((40, 20), ((5, 10), (255, 0, 0), 40)))
    out["cmyk.jpg"] = (_enc(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95),
                       _check_rgb((16, 16), ((8, 8), (255, 0, 0), 30)))
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    pal.paste(0, (0, 0, 4, 8))  # left half index 0, transparent
    out["palette_transparent.png"] = (_enc(pal, "PNG", transparency=0),
                                      _check_rgb((8, 8), ((1, 1), (255, 255, 255), 0)))
    g16 = Image.fromarray(np.full((6, 6), 32896, np.uint16))  # 32896 / 65535 * 255 = 128
    out["gray16.png"] = (_enc(g16, "PNG"), _check_rgb((6, 6), ((2, 2), (128, 128, 128), 1)))
    out["gray16.tif"] = (_enc(Image.fromarray(np.full((6, 6), 65535, np.uint16)), "TIFF"),
                         _check_rgb((6, 6), ((2, 2), (255, 255, 255), 0)))
    out["float01.tif"] = (_enc(Image.fromarray(np.full((5, 5), 0.5, np.float32)), "TIFF"),
                          _check_rgb((5, 5), ((2, 2), (128, 128, 128), 1)))
    out["la_transparent.png"] = (_enc(Image.new("LA", (7, 7), (0, 0)), "PNG"),
                                 _check_rgb((7, 7), ((3, 3), (255, 255, 255), 0)))
    rgba = Image.new("RGBA", (6, 6), (0, 0, 0, 128))
    out["rgba_half.png"] = (_enc(rgba, "PNG"), _check_rgb((6, 6), ((3, 3), (127, 127, 127), 2)))
    one = Image.new("1", (9, 9), 1)
    one.putpixel((0, 0), 0)
    out["one_bit.png"] = (_enc(one, "PNG"), _check_rgb((9, 9), ((5, 5), (255, 255, 255), 0)))
    out["gray.jpg"] = (_enc(Image.new("L", (10, 10), 77), "JPEG", quality=95),
                       _check_rgb((10, 10), ((5, 5), (77, 77, 77), 3)))
    out["png_named.jpg"] = (_enc(_halves(), "PNG"), _check_rgb((40, 20), ((30, 10), (0, 0, 255), 0)))
    out["one_pixel.png"] = (_enc(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), _check_rgb((1, 1), ((0, 0), (1, 2, 3), 0)))
    out["thin_strip.png"] = (_enc(Image.new("RGB", (1500, 2), (9, 9, 9)), "PNG"), _check_rgb((1500, 2)))
    out["progressive.jpg"] = (_enc(_noise(64, 48), "JPEG", quality=90, progressive=True), _check_rgb((64, 48)))
    out["photo.webp"] = (_enc(_noise(), "WEBP"), _check_rgb((48, 32)))
    out["photo.bmp"] = (_enc(_halves(), "BMP"), _check_rgb((40, 20), ((1, 1), (255, 0, 0), 0)))
    out["multi_page.tif"] = (_multi_page_tiff(), _check_rgb((12, 12), ((6, 6), (0, 255, 0), 0)))
    # odd file names: spaces, non-ASCII, a leading dash, a newline
    out["with spaces ünïcödé.png"] = (_enc(_noise(), "PNG"), _check_rgb((48, 32)))
    out["-leading-dash.png"] = (_enc(_noise(), "PNG"), _check_rgb((48, 32)))
    out["new\nline.png"] = (_enc(_noise(), "PNG"), _check_rgb((48, 32)))
    return out


def _multi_page_tiff() -> bytes:
    buf = io.BytesIO()
    first = Image.new("RGB", (12, 12), (0, 255, 0))
    first.save(buf, format="TIFF", save_all=True, append_images=[Image.new("RGB", (12, 12), (255, 0, 0))])
    return buf.getvalue()


def corpus_bytes() -> tuple[dict[str, tuple[bytes, str]], dict[str, tuple[bytes, Callable]]]:
    """(bad name -> (bytes, reason), good name -> (bytes, check)) for the regular files."""
    return _bad_bytes(), _good_bytes()


# special files that only exist on a file system: name -> reason
SPECIAL = {"fifo.jpg": "not_a_file", "dangling_link.jpg": "unreadable", "link_loop.png": "unreadable",
           "huge_sparse.jpg": "too_large"}


def write_corpus(folder: Path, special: bool = True) -> tuple[dict[str, str], dict[str, Callable]]:
    """Write the corpus into ``folder``; returns (bad name -> reason, good name -> check)."""
    from openseer.data.decode import MAX_FILE_BYTES

    folder.mkdir(parents=True, exist_ok=True)
    bad, good = corpus_bytes()
    for name, (data, _) in {**bad, **good}.items():
        (folder / name).write_bytes(data)
    # a file name that is not valid UTF-8 (bytes on disk); Python sees it with surrogate escapes
    raw = os.fsencode(str(folder)) + b"/latin1_\xe9t\xe9.png"
    with open(raw, "wb") as f:
        f.write(_enc(_noise(), "PNG"))
    good_checks = {n: c for n, (_, c) in good.items()}
    good_checks[os.fsdecode(b"latin1_\xe9t\xe9.png")] = _check_rgb((48, 32))
    reasons = {n: r for n, (_, r) in bad.items()}
    if special:
        os.mkfifo(folder / "fifo.jpg")
        os.symlink(folder / "does-not-exist.jpg", folder / "dangling_link.jpg")
        os.symlink(folder / "link_loop.png", folder / "link_loop.png")
        with open(folder / "huge_sparse.jpg", "wb") as f:
            f.truncate(MAX_FILE_BYTES + 1)
        reasons.update(SPECIAL)
    return reasons, good_checks
