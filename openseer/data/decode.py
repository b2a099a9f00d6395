"""Robust image decoding: every file either becomes an image or a ``BadImage`` with a reason.

Web-scale piles hold truncated files, zero-byte files, HTML saved as .jpg, decompression bombs and
odd colour modes. Decoding never crashes the run: the caller counts the reason and moves on.
Valid but unusual images are converted deliberately: EXIF orientation applied (a broken EXIF block
is ignored, not fatal), palette and alpha composited on white, CMYK/1-bit/LA converted to RGB.

What a decoded image is depends on the channels the backbone wants (``Decoding.channels``, from
``model.in_chans``): with 3 (the default) an 8-bit RGB PIL image, 16-bit and float images scaled
to 8 bits and grey replicated, as every RGB backbone and SEER checkpoint expects; with 1 a PIL
``F`` image (float32 grey in [0, 1]) at the file's full depth: a 16-bit PNG or TIFF is divided by
65535 (its real range), never flattened to 8 bits first; colour is turned to luminance.

DICOM (``.dcm``, ``.dicom``; recognised by the ``DICM`` marker at byte 128, whatever the name) is
decoded with pydicom: the frame's stored values, then the modality rescale (RescaleSlope and
RescaleIntercept, or a modality LUT; per-frame groups of enhanced multi-frame files too), then a
window (``data.dicom_window``): ``auto`` uses the file's WindowCenter/WindowWidth (the first pair
when several are given) and, without one, the frame's own min..max; ``none`` maps the real range
of the stored bits (BitsStored, signed or not, after the rescale) to [0, 1]; ``C,W`` is a window
given by the user (e.g. ``40,400`` for soft tissue in Hounsfield units). The window is DICOM's
linear one (PS3.3 C.11.2.1.2.1). MONOCHROME1 (bright = low values) is inverted, so bright is always
high. Colour DICOM (RGB, YBR: converted by pydicom; PALETTE COLOR through its LUT) is scaled by its
bits. A multi-frame file is decoded one frame at a time (``frame``; the middle one by default, see
data/collection.py for ``data.dicom_frames=all``). A compressed transfer syntax whose decoder is
not installed (e.g. JPEG-LS without pylibjpeg-libjpeg or pyjpegls) is skipped as ``no_decoder``,
a DICOM file without pixel data (a structured report, an RT plan) as ``not_an_image``.

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
``no_decoder``      a compressed DICOM whose transfer syntax has no decoder installed
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
from dataclasses import dataclass
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
DICOM_EXTENSIONS = (".dcm", ".dicom")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".jpe", ".jfif",
                    ".dib", ".ppm", ".pgm", ".pbm", ".pnm") + DICOM_EXTENSIONS
# the decoders PIL may use: the content decides which (a PNG named .jpg is a PNG), but only among these
# (no EPS, which runs Ghostscript, and no format guessed from a header with no signature, like TGA)
Image.init()  # every plugin registered, so the list below is checked against what this PIL has
PIL_FORMATS = tuple(f for f in ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "DIB", "TIFF", "PPM") if f in Image.OPEN)
REASONS = ("empty", "truncated", "corrupt", "not_an_image", "too_many_pixels", "too_large",
           "unreadable", "not_a_file", "timeout", "no_decoder")

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
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP") or is_dicom(data)


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: the ``DICM`` marker after the 128-byte preamble."""
    return data[128:132] == b"DICM"


@dataclass(frozen=True)
class Decoding:
    """How a reader decodes: the channels the backbone takes and the DICOM window.

    ``channels`` 3: 8-bit RGB PIL images (as SEER and every RGB backbone expect); 1: PIL ``F``
    images, float32 grey in [0, 1] at the file's full depth. ``dicom_window``: ``auto``, ``none``
    or ``C,W`` (the module docstring)."""

    channels: int = 3
    dicom_window: str = "auto"

    @classmethod
    def from_config(cls, data_cfg=None, channels: int = 3) -> Decoding:
        """From a ``DataConfig`` (its ``dicom_window``) and ``model.in_chans``."""
        return cls(int(channels), str(getattr(data_cfg, "dicom_window", "auto")))

    @property
    def window(self) -> tuple[float, float] | str:
        """``'auto'``, ``'none'`` or (centre, width); a ``DataError`` for anything else."""
        return parse_window(self.dicom_window)


def parse_window(text: str) -> tuple[float, float] | str:
    """``data.dicom_window``: ``auto``, ``none`` or ``C,W`` (centre, width > 0)."""
    t = str(text).strip().lower()
    if t in ("auto", "none"):
        return t
    try:
        c, w = (float(v) for v in t.split(","))
    except ValueError:
        raise DataError(f"data.dicom_window must be auto, none or CENTRE,WIDTH (e.g. 40,400); got {text!r}") from None
    if not w > 0:
        raise DataError(f"data.dicom_window: the width must be > 0; got {text!r}")
    return c, w


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


def to_grey(img: Image.Image) -> Image.Image:
    """Any PIL mode as a PIL ``F`` image in [0, 1] at its full depth (16-bit: / 65535; colour: luminance)."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        top = float(arr.max()) if arr.size else 0.0
        if mode.startswith("I;16"):
            hi = 65535.0
        elif mode == "F" and top <= 1.0:
            hi = 1.0
        else:
            hi = 65535.0 if top > 255 else 255.0
        return Image.fromarray(np.clip(arr / hi, 0.0, 1.0).astype(np.float32), mode="F")
    if mode == "L":
        return Image.fromarray(np.asarray(img, dtype=np.float32) / 255.0, mode="F")
    return Image.fromarray(np.asarray(to_rgb(img).convert("L"), dtype=np.float32) / 255.0, mode="F")


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
           jpeg_only: bool = False, channels: int = 3) -> Image.Image:
    """Decode an image opened with ``open_bytes`` (optionally reduced), apply EXIF, make it RGB
    (``channels`` 3) or full-depth grey ``F`` in [0, 1] (``channels`` 1).

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
        img = to_rgb(img) if channels == 3 else to_grey(img)
        if reduce_after > 1:
            img = img.reduce(reduce_after)  # box filter on RGB or F (fast), whole image kept
        if img.width < 1 or img.height < 1:
            raise BadImage("corrupt", f"{name}: zero-sized image")
        return img


def decode_bytes(data: bytes, name: str = "<bytes>", draft_size: int | None = None,
                 min_pixels: int | None = None, decoding: Decoding | None = None,
                 frame: int | None = None) -> Image.Image:
    """Decode encoded image bytes into a PIL image (RGB, or ``F`` with ``decoding.channels`` 1),
    or raise ``BadImage``.

    ``min_pixels``: decode at a reduced size (see the module doc) as long as at least this many
    pixels remain. ``draft_size`` (evaluation, embedding): keep both sides >= draft_size, reducing
    only JPEG decoding (DCT scaling); other formats come back whole, as PIL decodes them.
    ``frame``: the frame of a multi-frame DICOM file (None: the middle one).
    """
    decoding = decoding or DEFAULT_DECODING
    if is_dicom(data):
        return decode_dicom(data, name, decoding, frame, None if draft_size and not min_pixels else min_pixels)
    img = open_bytes(data, name)
    if draft_size and not min_pixels:
        scale = int(min(img.size) // draft_size)
        min_pixels = (img.width // max(scale, 1)) * (img.height // max(scale, 1)) if scale >= 2 else None
        return finish(img, name, data, min_pixels, jpeg_only=True, channels=decoding.channels)
    return finish(img, name, data, min_pixels, channels=decoding.channels)


# ---------------------------------------------------------------- DICOM


DEFAULT_DECODING = Decoding()


def _read_dicom(source, name: str, header_only: bool = False):
    """A pydicom Dataset from bytes or a path; ``BadImage`` when it is not DICOM or is cut short."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about odd but readable files: noise here
            fp = io.BytesIO(source) if isinstance(source, bytes) else source
            return pydicom.dcmread(fp, stop_before_pixels=header_only)
    except InvalidDicomError as e:
        raise BadImage("not_an_image", f"{name}: {e}") from None
    except (EOFError, OSError) as e:
        raise BadImage("truncated", f"{name}: {e}") from None
    except Exception as e:  # a damaged header: pydicom raises many kinds
        text = str(e).lower()
        reason = "truncated" if "end of file" in text or "truncat" in text or "premature" in text else "corrupt"
        raise BadImage(reason, f"{name}: {type(e).__name__}: {e}") from None


def dicom_frame_count(path: str | os.PathLike, timeout: float | None = None) -> int:
    """The number of frames of a DICOM file, from its header (bounded time); 1 when it cannot be told
    (the file's problem is then reported when it is read)."""
    def count() -> int:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO named .dcm: never opened (it could block)
            return 1
        ds = _read_dicom(os.fspath(path), os.fsdecode(path), header_only=True)
        return max(int(ds.get("NumberOfFrames") or 1), 1)

    try:
        return call_with_timeout(count, default_read_timeout() if timeout is None else timeout, os.fsdecode(path))
    except (BadImage, OSError, ValueError, TypeError):
        return 1


def _first(value) -> float:
    """The first value of a possibly multi-valued DICOM number (WindowCenter '40\\400' -> 40)."""
    from pydicom.multival import MultiValue

    return float(value[0] if isinstance(value, (MultiValue, list, tuple)) else value)


def _functional(ds, index: int, sequence: str):
    """The item of ``sequence`` for frame ``index`` in an enhanced file's per-frame or shared groups."""
    for groups, per_frame in ((ds.get("PerFrameFunctionalGroupsSequence"), True),
                              (ds.get("SharedFunctionalGroupsSequence"), False)):
        if groups:
            group = groups[min(index, len(groups) - 1)] if per_frame else groups[0]
            if sequence in group and group[sequence].value:
                return group[sequence][0]
    return None


def _dicom_attr(ds, index: int, sequence: str, keyword: str):
    """``keyword`` at the top level of ``ds``, else in the frame's functional group ``sequence``."""
    if keyword in ds and ds[keyword].value not in (None, ""):
        return ds[keyword].value
    item = _functional(ds, index, sequence)
    return item.get(keyword) if item is not None else None


def _window(x: np.ndarray, centre: float, width: float, function: str) -> np.ndarray:
    """DICOM's VOI window (PS3.3 C.11.2.1.2): LINEAR (the default), LINEAR_EXACT or SIGMOID, to [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - centre) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - centre) / width + 0.5, 0.0, 1.0)
    return np.clip((x - (centre - 0.5)) / max(width - 1.0, 1e-6) + 0.5, 0.0, 1.0)


def _span(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(x)


def dicom_pixels(data: bytes, name: str = "<bytes>", window: tuple[float, float] | str = "auto",
                 frame: int | None = None) -> np.ndarray:
    """One frame of a DICOM file as float32 in [0, 1]: (H, W) grey or (H, W, 3) colour, after the
    modality rescale, the window and MONOCHROME1 inversion (the module docstring); ``BadImage``
    with a reason otherwise (``no_decoder`` for a compressed syntax without its decoder)."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder, pixel_array

    ds = _read_dicom(data, name)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise BadImage("not_an_image", f"{name}: a DICOM file without pixel data ({ds.get('Modality', '?')})")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise BadImage("corrupt", f"{name}: DICOM pixel data without Rows/Columns") from None
    if rows < 1 or cols < 1:
        raise BadImage("corrupt", f"{name}: zero-sized DICOM image")
    if rows * cols > MAX_PIXELS:
        raise BadImage("too_many_pixels", f"{name}: {cols}x{rows} > {MAX_PIXELS} pixels")
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None and syntax.is_compressed:
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:
            raise BadImage("no_decoder", f"{name}: pydicom has no decoder for {syntax.name}") from None
        if not decoder.is_available:
            needs = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
            raise BadImage("no_decoder", f"{name}: {syntax.name} needs a decoder ({needs})")
    n = max(int(ds.get("NumberOfFrames") or 1), 1)
    index = n // 2 if frame is None else int(frame)
    if not 0 <= index < n:
        raise BadImage("corrupt", f"{name}: no frame {index} (the file has {n})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = pixel_array(ds, index=index if n > 1 else None)
    except MemoryError:
        raise BadImage("too_many_pixels", f"{name}: out of memory while decoding") from None
    except Exception as e:  # short pixel data, a decoder's complaint: a bad file, never a crash
        text = str(e).lower()
        reason = "truncated" if any(w in text for w in ("shorter", "less than", "truncat", "end of")) else "corrupt"
        raise BadImage(reason, f"{name}: {type(e).__name__}: {e}") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2]) if "RedPaletteColorLookupTableDescriptor" in ds else 16
        return np.clip(rgb.astype(np.float32) / float(2 ** bits - 1), 0, 1)
    if arr.ndim == 3:  # RGB (YBR converted to RGB by pydicom)
        bits = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
        return np.clip(arr.astype(np.float32) / float(2 ** bits - 1), 0, 1)
    x = arr.astype(np.float64)
    lut = "ModalityLUTSequence" in ds
    slope = float(_dicom_attr(ds, index, "PixelValueTransformationSequence", "RescaleSlope") or 1.0)
    intercept = float(_dicom_attr(ds, index, "PixelValueTransformationSequence", "RescaleIntercept") or 0.0)
    x = apply_modality_lut(arr, ds).astype(np.float64) if lut else x * slope + intercept
    if window == "auto":
        centre = _dicom_attr(ds, index, "FrameVOILUTSequence", "WindowCenter")
        width = _dicom_attr(ds, index, "FrameVOILUTSequence", "WindowWidth")
        function = str(_dicom_attr(ds, index, "FrameVOILUTSequence", "VOILUTFunction") or "LINEAR").upper()
        if centre is not None and width is not None and _first(width) > 0:
            y = _window(x, _first(centre), _first(width), function)
        else:
            y = _span(x, float(x.min()), float(x.max()))
    elif window == "none":
        bits = ds.get("BitsStored")
        if bits and not lut and arr.dtype.kind in "iu":
            signed = int(ds.get("PixelRepresentation") or 0) == 1
            lo, hi = (-(2 ** (int(bits) - 1)), 2 ** (int(bits) - 1) - 1) if signed else (0, 2 ** int(bits) - 1)
            ends = sorted((lo * slope + intercept, hi * slope + intercept))
            y = _span(x, ends[0], ends[1])
        else:  # float pixel data or a modality LUT: the frame's own range
            y = _span(x, float(x.min()), float(x.max()))
    else:
        y = _window(x, float(window[0]), float(window[1]), "LINEAR")
    if photometric == "MONOCHROME1":
        y = 1.0 - y
    return y.astype(np.float32)


def decode_dicom(data: bytes, name: str = "<bytes>", decoding: Decoding | None = None, frame: int | None = None,
                 min_pixels: int | None = None) -> Image.Image:
    """One DICOM frame as the readers want it: RGB 8-bit (``channels`` 3, grey replicated) or ``F``
    (``channels`` 1, full depth); box-reduced to keep ``min_pixels`` (multi-crop)."""
    decoding = decoding or DEFAULT_DECODING
    arr = dicom_pixels(data, name, decoding.window, frame)
    if decoding.channels == 1:
        grey = arr if arr.ndim == 2 else arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        img = Image.fromarray(np.ascontiguousarray(grey, dtype=np.float32), mode="F")
    else:
        u8 = np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(u8, mode="L").convert("RGB") if u8.ndim == 2 else Image.fromarray(u8, mode="RGB")
    if min_pixels:
        s = draft_scale(img.width, img.height, min_pixels)
        if s > 1:
            img = img.reduce(s)
    return img


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


def load_image(path: str | Path, draft_size: int | None = None, min_pixels: int | None = None,
               decoding: Decoding | None = None) -> Image.Image:
    """Read and decode a file; unreadable files are ``BadImage('unreadable')``."""
    data = read_file(path)
    return decode_bytes(data, str(path), draft_size=draft_size, min_pixels=min_pixels, decoding=decoding)


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
