"""Robust image decoding: every file either becomes an RGB image or a ``BadImage`` with a reason.

Web-scale piles hold truncated files, zero-byte files, HTML saved as .jpg, decompression bombs and
odd colour modes. Decoding never crashes the run: the caller counts the reason and moves on.
Valid but unusual images are converted deliberately: EXIF orientation applied, palette and alpha
composited on white, 16-bit scaled to 8-bit, CMYK/1-bit/LA converted to RGB.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# A pixel limit guards against decompression bombs (a 100-KB PNG that inflates to 100 GB).
MAX_PIXELS = 178_956_970  # PIL's own default, set explicitly so nothing can lift it silently
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is bad, not half-grey

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


class BadImage(Exception):
    """A file that cannot be used as an image; ``reason`` is a short category for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB the way a person would expect to see it."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decode_bytes(data: bytes, name: str = "<bytes>", draft_size: int | None = None) -> Image.Image:
    """Decode encoded image bytes into an RGB PIL image, or raise ``BadImage``.

    ``draft_size``: for JPEGs, let libjpeg decode at a reduced scale (DCT scaling) as long as
    both sides stay at least this many pixels; much faster for large photos.
    """
    if len(data) == 0:
        raise BadImage("empty", name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if draft_size and img.format == "JPEG":
                w, h = img.size
                scale = min(w, h) / draft_size
                if scale >= 2:
                    img.draft("RGB", (int(w / scale) + 1, int(h / scale) + 1))
            img.load()
            img = ImageOps.exif_transpose(img)
            img = to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("too_many_pixels", f"{name}: {e}") from None
    except UnidentifiedImageError:
        raise BadImage("not_an_image", name) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        text = str(e).lower()
        reason = "truncated" if ("truncated" in text or "premature" in text or "broken" in text) else "corrupt"
        raise BadImage(reason, f"{name}: {e}") from None
    except Exception as e:  # any decoder bug: still a bad file, never a crash
        raise BadImage("corrupt", f"{name}: {type(e).__name__}: {e}") from None
    if img.width < 1 or img.height < 1:
        raise BadImage("corrupt", f"{name}: zero-sized image")
    return img


def load_image(path: str | Path, draft_size: int | None = None) -> Image.Image:
    """Read and decode a file; unreadable files are ``BadImage('unreadable')``."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BadImage("unreadable", f"{path}: {e.strerror or e}") from None
    return decode_bytes(data, str(path), draft_size=draft_size)
