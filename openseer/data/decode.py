"""Robust image decoding: every file either becomes an RGB image or a ``BadImage`` with a reason.

Web-scale piles hold truncated files, zero-byte files, HTML saved as .jpg, decompression bombs and
odd colour modes. Decoding never crashes the run: the caller counts the reason and moves on.
Valid but unusual images are converted deliberately: EXIF orientation applied (a broken EXIF block
is ignored, not fatal), palette and alpha composited on white, 16-bit and float scaled to 8-bit,
CMYK/1-bit/LA converted to RGB.

Reasons (``BadImage.reason``), the same everywhere (folders, shards, the shard writer):

=================== ==========================================================================
``empty``           a zero-byte file
``truncated``       an image whose data stops early
``corrupt``         an image signature with data that does not decode (bad CRC, garbage, ...)
``not_an_image``    bytes that are no image format at all (HTML, text, random bytes)
``too_many_pixels`` more than ``MAX_PIXELS`` pixels (decompression bombs)
``too_large``       a file over ``MAX_FILE_BYTES`` (never read into memory)
``unreadable``      the file cannot be read (permissions, broken symlink, I/O error)
``not_a_file``      a FIFO, socket or device with an image name (reading it could hang)
=================== ==========================================================================

Reduced-size decoding (``min_pixels``): multi-crop never needs more pixels than
``reduced_decode_pixels(crops)``, so a JPEG much larger than that is decoded with libjpeg's DCT
scaling (PIL ``draft``, 1/2, 1/4 or 1/8 per side) and other formats are box-reduced after
decoding. Both keep the full field of view, so random-resized-crop scales (fractions of the
image area) mean the same thing as on the full image. An image with transparency is box-reduced
before it is composited on white (``reduce`` premultiplies alpha, so the result is the same up to
rounding, and compositing a 1/64 of the pixels is what makes it cheap).

Plain 8-bit PNGs (grey, RGB, grey + alpha, RGBA, no EXIF block) are decoded by libpng through the
``imagecodecs`` package when it is installed: the same pixels as PIL's decoder, faster (zlib-ng).
Anything else, and any PNG libpng refuses, goes through PIL, which also names what is wrong.
"""

from __future__ import annotations

import io
import math
import os
import queue
import stat
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..config import DataConfig, OpenseerError

try:  # libpng + zlib-ng: the same pixels as PIL's PNG decoder in about 0.7 of the time (docs/data.md)
    import imagecodecs as _imagecodecs

    _png_decode = _imagecodecs.png_decode if _imagecodecs.PNG.available else None
except Exception:  # not installed, or a broken build: PIL decodes every PNG
    _png_decode = None

# A pixel limit guards against decompression bombs (a 100-KB PNG that inflates to 100 GB).
MAX_PIXELS = 178_956_970  # PIL's own default, set explicitly so nothing can lift it silently
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is bad, not half-grey
MAX_FILE_BYTES = 256 * 1024 * 1024  # larger files are skipped as 'too_large' without reading them

# file names that are read as images (compared in lower case: .JPG and .Jpeg are images too)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".jpe", ".jfif",
                    ".dib", ".ppm", ".pgm", ".pbm", ".pnm")
# the decoders PIL may use: the content decides which (a PNG named .jpg is a PNG), but only among these
# (no EPS, which runs Ghostscript, and no format guessed from a header with no signature, like TGA)
Image.init()  # every plugin registered, so the list below is checked against what this PIL has
PIL_FORMATS = tuple(f for f in ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "DIB", "TIFF", "PPM") if f in Image.OPEN)
REASONS = ("empty", "truncated", "corrupt", "not_an_image", "too_many_pixels", "too_large",
           "unreadable", "not_a_file", "timeout")

# unambiguous leading bytes of image formats; used to tell 'corrupt' from 'not_an_image'
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"II*\x00", b"MM\x00*")


class DataError(OpenseerError, ValueError):
    """A data path or data set problem, with a message saying what and where."""


class BadImage(Exception):
    """A file that cannot be used as an image; ``reason`` is a short category for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _looks_like_image(data: bytes) -> bool:
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _lacks_end(data: bytes) -> bool:
    """A PNG without its IEND chunk or a JPEG without its EOI marker: the file was cut short."""
    if data.startswith(b"\x89PNG"):
        return b"IEND" not in data[-16:]
    if data.startswith(b"\xff\xd8"):
        return b"\xff\xd9" not in data[-64:]
    return False


def _failure_reason(data: bytes, text: str) -> str:
    text = text.lower()
    if "truncated" in text or "premature" in text or _lacks_end(data):
        return "truncated"
    return "corrupt"


def _opaque(img: Image.Image) -> bool:
    """An RGBA or LA image whose alpha is 255 everywhere (nothing to composite)."""
    return img.mode in ("RGBA", "LA") and img.getchannel("A").getextrema()[0] == 255


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB the way a person would expect to see it."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = float(arr.max()) if arr.size else 0.0
        if mode.startswith("I;16"):
            hi = 65535.0
        elif mode == "F" and top <= 1.0:
            hi = 1.0  # float images hold 0..1
        else:
            hi = 65535.0 if top > 255 else 255.0  # 32-bit int: 16-bit data or 8-bit data
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        if _opaque(img):
            return img.convert("RGB")  # fully opaque: nothing to composite (much faster)
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _exif_transpose(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a broken EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # malformed EXIF is metadata noise, not a reason to drop a good image
        return img


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1..8; 1 when absent or unreadable). Call it on a decoded image:
    for PNG, PIL loads the pixels to find EXIF, and a failure there would be silently swallowed."""
    try:
        value = int(img.getexif().get(0x0112, 1))
    except Exception:
        return 1
    return value if 1 <= value <= 8 else 1


@contextmanager
def _classified(name: str, data: bytes) -> Iterator[None]:
    """Turn anything PIL raises into a ``BadImage`` with a countable reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. "Corrupt EXIF data": noise, not a failure
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("too_many_pixels", f"{name}: {e}") from None
    except UnidentifiedImageError:
        if _looks_like_image(data):
            raise BadImage(_failure_reason(data, ""), f"{name}: unrecognised image data") from None
        raise BadImage("not_an_image", name) from None
    except MemoryError:
        raise BadImage("too_many_pixels", f"{name}: out of memory while decoding") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(_failure_reason(data, str(e)), f"{name}: {e}") from None
    except Exception as e:  # any decoder bug: still a bad file, never a crash
        raise BadImage("corrupt", f"{name}: {type(e).__name__}: {e}") from None


def open_bytes(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Open encoded bytes lazily (header only, pixel-limit checked); raises ``BadImage``."""
    if len(data) == 0:
        raise BadImage("empty", name)
    with _classified(name, data):
        img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
        if img.width < 1 or img.height < 1:
            raise BadImage("corrupt", f"{name}: zero-sized image")
        return img


def draft_scale(width: int, height: int, min_pixels: int) -> int:
    """The largest DCT scale 8, 4 or 2 that keeps at least ``min_pixels`` pixels (1 = none)."""
    for s in (8, 4, 2):
        if (width // s) * (height // s) >= min_pixels:
            return s
    return 1


_PNG_MODES = {0: "L", 2: "RGB", 4: "LA", 6: "RGBA"}  # 8-bit PNG colour types -> the mode PIL opens them in


def decode_png_fast(img: Image.Image, data: bytes) -> Image.Image | None:
    """A plain 8-bit PNG (grey, RGB, grey + alpha, RGBA; no EXIF) decoded by libpng, or None: let PIL do it.

    ``img`` is the same bytes opened lazily by PIL (format, mode and size already checked, the pixel
    limit included). An RGBA image whose alpha is 255 everywhere comes back as RGBX (the same pixels
    without an alpha to composite: 16 instead of 43 ms to reduce a 5120x2880 one). Palette, 16-bit
    and 1/2/4-bit images, colour-keyed transparency, EXIF, files without their end chunk and anything
    libpng refuses return None, so every such file is decoded (or classified as bad) as before.
    """
    if (_png_decode is None or img.format != "PNG" or data[12:16] != b"IHDR" or data[24] != 8
            or _PNG_MODES.get(data[25]) != img.mode or "transparency" in img.info
            or b"eXIf" in data or b"Raw profile type exif" in data or _lacks_end(data)):
        return None
    try:
        arr = _png_decode(data)
    except Exception:
        return None
    channels = arr.shape[2] if arr.ndim == 3 else 1
    if arr.dtype != np.uint8 or arr.shape[:2] != (img.height, img.width) or channels != len(img.mode):
        return None
    if channels == 4 and arr[..., 3].min() == 255:  # opaque RGBA: nothing to composite, skip the alpha
        return Image.frombuffer("RGBX", (img.width, img.height), arr, "raw", "RGBX", 0, 1)
    return Image.fromarray(arr)


def finish(img: Image.Image, name: str, data: bytes, min_pixels: int | None = None,
           jpeg_only: bool = False) -> Image.Image:
    """Decode an image opened with ``open_bytes`` (optionally reduced), apply EXIF, make it RGB.

    ``jpeg_only``: reduce only where decoding gets cheaper (JPEG DCT scaling); other formats are
    returned at full size, so their pixels equal what PIL gives for the whole file.
    """
    with _classified(name, data):
        w, h = img.size
        reduce_after = 1
        if min_pixels:
            s = draft_scale(w, h, min_pixels)
            if s > 1 and img.format in ("JPEG", "MPO"):
                img.draft("RGB", (w // s, h // s))  # DCT scaling: 1/s of each side, whole image
            elif not jpeg_only:
                reduce_after = s
        fast = decode_png_fast(img, data)
        if fast is None:
            img.load()
            img = _exif_transpose(img)
        else:
            img = fast  # no EXIF block: nothing to transpose
        if reduce_after > 1 and img.mode in ("RGBX", "RGBA", "LA"):
            if _opaque(img):
                img = img.convert("RGB")  # what to_rgb would do, before the reduction
            else:  # RGBX (opaque RGBA from libpng): reduce, then drop X; transparent: composite after
                img, reduce_after = img.reduce(reduce_after), 1  # reducing (alpha premultiplied)
        img = to_rgb(img)
        if reduce_after > 1:
            img = img.reduce(reduce_after)  # box filter on RGB (fast), whole image kept
        if img.width < 1 or img.height < 1:
            raise BadImage("corrupt", f"{name}: zero-sized image")
        return img


def decode_bytes(data: bytes, name: str = "<bytes>", draft_size: int | None = None,
                 min_pixels: int | None = None) -> Image.Image:
    """Decode encoded image bytes into an RGB PIL image, or raise ``BadImage``.

    ``min_pixels``: decode at a reduced size (see the module doc) as long as at least this many
    pixels remain. ``draft_size`` (evaluation, embedding): keep both sides >= draft_size, reducing
    only JPEG decoding (DCT scaling); other formats come back whole, as PIL decodes them.
    """
    img = open_bytes(data, name)
    if draft_size and not min_pixels:
        scale = int(min(img.size) // draft_size)
        min_pixels = (img.width // max(scale, 1)) * (img.height // max(scale, 1)) if scale >= 2 else None
        return finish(img, name, data, min_pixels, jpeg_only=True)
    return finish(img, name, data, min_pixels)


def read_file(path: str | Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file, or ``BadImage`` ('unreadable', 'not_a_file', 'too_large', 'empty').

    FIFOs, sockets and devices are refused before reading: the file is opened without blocking
    (``O_NONBLOCK``: opening a FIFO with no writer would wait forever) and checked on the open
    descriptor, so a FIFO put in place of a checked file cannot block either. A file system that
    hangs (a dead network mount) is bounded by ``read_bytes``'s timeout below, not here.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise BadImage("unreadable", f"{path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BadImage("not_a_file", f"{path}: not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise BadImage("unreadable", f"{path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadImage("not_a_file", f"{path}: not a regular file")
        if st.st_size > max_bytes:
            raise BadImage("too_large", f"{path}: {st.st_size} bytes > {max_bytes}")
        if st.st_size == 0:
            raise BadImage("empty", str(path))
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(max_bytes + 1)
    except OSError as e:
        raise BadImage("unreadable", f"{path}: {e.strerror or e}") from None
    finally:
        os.close(fd)



# ---------------------------------------------------------------- bounded reads

T = TypeVar("T")


def default_read_timeout() -> float:
    """``$OPENSEER_READ_TIMEOUT`` when set (seconds, > 0), else ``data.read_timeout``'s default."""
    text = os.environ.get("OPENSEER_READ_TIMEOUT", "")
    if not text:
        return DataConfig.read_timeout
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"OPENSEER_READ_TIMEOUT must be a number of seconds; got {text!r}") from None
    if value <= 0:
        raise DataError(f"OPENSEER_READ_TIMEOUT must be > 0 seconds; got {text!r}")
    return value


class _Readers:
    """Daemon threads that run reads for ``call_with_timeout``, started as needed and reused.

    A caller reserves an idle thread (or starts one), hands it the job and waits for the answer up
    to the timeout. A thread stuck in a read is never idle again, so no later read waits behind it.
    """

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.idle = 0

    def reset(self) -> None:  # in a forked child: the parent's threads do not exist there
        self.__init__()

    def call(self, fn: Callable[[], T], timeout: float) -> tuple[bool, object]:
        reply: queue.SimpleQueue = queue.SimpleQueue()
        with self.lock:
            if self.idle:
                self.idle -= 1
            else:
                threading.Thread(target=self._serve, name="openseer-read", daemon=True).start()
        self.jobs.put((fn, reply))
        return reply.get(timeout=timeout)

    def _serve(self) -> None:
        while True:
            fn, reply = self.jobs.get()
            try:
                reply.put((True, fn()))
            except BaseException as e:  # handed to the caller's thread
                reply.put((False, e))
            with self.lock:
                self.idle += 1


_READERS = _Readers()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_READERS.reset)


def call_with_timeout(fn: Callable[[], T], timeout: float, what: str) -> T:
    """``fn()``, or ``BadImage('timeout')`` when it has not returned after ``timeout`` seconds.

    ``fn`` runs in a daemon thread: a read stuck in the kernel cannot be interrupted, so it is left
    behind (it ends if the file system ever answers, and never keeps the process from exiting).
    """
    try:
        ok, value = _READERS.call(fn, timeout)
    except queue.Empty:
        raise BadImage("timeout", f"{what}: no answer after {timeout:g} s (data.read_timeout)") from None
    if not ok:
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]


def read_bytes(path: str | os.PathLike, timeout: float | None = None) -> bytes:
    """The bytes of one image file, read in bounded time; ``BadImage`` with a reason otherwise."""
    timeout = default_read_timeout() if timeout is None else timeout
    return call_with_timeout(lambda: read_file(path), timeout, os.fsdecode(path))


def load_image(path: str | Path, draft_size: int | None = None, min_pixels: int | None = None) -> Image.Image:
    """Read and decode a file; unreadable files are ``BadImage('unreadable')``."""
    data = read_file(path)
    return decode_bytes(data, str(path), draft_size=draft_size, min_pixels=min_pixels)


UPSAMPLE_TOLERANCE = 1.05  # the most extreme crop may be upsampled by up to 5% per side


def reduced_decode_pixels(sizes: list[int], min_scales: list[float], ratio_min: float = 3 / 4,
                          tolerance: float = UPSAMPLE_TOLERANCE) -> int:
    """Fewest decoded pixels for which no multi-crop output is upsampled by more than ``tolerance``.

    A crop of output size S drawn at area scale ``lo`` with aspect ratio down to ``ratio_min`` has
    a short side of sqrt(lo * A * ratio_min) pixels in an image of A pixels; it is not upsampled
    when that is >= S. Only crops at both the smallest scale and the most extreme aspect ratio come
    near the bound. SEER's 2x160 (0.14-1) + 4x96 (0.05-0.14) gives 245,760 pixels exactly, 222,912
    with the default 5% tolerance (so a 5120x2880 photo decodes at 1/8 scale, 640x360).
    """
    exact = max(s * s / (lo * ratio_min) for s, lo in zip(sizes, min_scales))
    return int(math.ceil(exact / (tolerance * tolerance)))
