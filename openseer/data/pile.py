"""A deterministic *uncurated* pile, made to look like a real one, for benchmarks and tests.

Real piles (a web crawl, an archive) are long-tailed, full of near-duplicates, off-topic pictures
and junk. ``build_pile(out, seed=...)`` writes such a pile as a folder of PNG/JPEG files:

* **in-domain**: Fashion-MNIST train images with a Zipf class balance (class ``c`` of the 10, in a
  seeded order, gets a share proportional to ``1 / (rank + 1) ** zipf``);
* **off-domain**: grey 28-px crops of real photographs (Debian's wallpaper packages under
  /usr/share/backgrounds and /usr/share/wallpapers), random position and size;
* **junk**: pure noise and near-blank images (a flat grey level plus faint noise);
* **near-duplicates**: images of the above re-encoded (JPEG quality 30-95), resized (0.5-2x),
  slightly cropped (keeping >= 80% of the area) or flipped, repeated many times: a heavy-tailed
  number of copies per source image, the largest groups several hundred copies.

The mix (counts per kind, class shares, group sizes) is returned and written to ``pile.json``, with
every file's kind, class and duplicate group in ``pile.csv`` (the answer key a benchmark scores
curation against). The same seed gives the same files, byte for byte.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import OpenseerError

PHOTO_ROOTS = (Path("/usr/share/backgrounds"), Path("/usr/share/wallpapers"))
PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
WALLPAPER_PACKAGES = ("gnome-backgrounds", "mate-backgrounds", "ukui-wallpapers", "plasma-workspace-wallpapers")


class PileError(OpenseerError, ValueError):
    """The pile cannot be built as asked (missing inputs), with what to do."""


def photograph_paths(roots: tuple[Path, ...] = PHOTO_ROOTS) -> list[Path]:
    """Raster photographs of the installed wallpaper packages, sorted (empty when none is installed)."""
    out: list[Path] = []
    for root in roots:
        if root.is_dir():
            out += [p for p in root.rglob("*") if p.suffix.lower() in PHOTO_EXTENSIONS and p.is_file()]
    return sorted(set(out))


def load_photographs(max_side: int = 1024, roots: tuple[Path, ...] = PHOTO_ROOTS,
                     distinct: bool = True, limit: int = 0) -> list[tuple[str, Image.Image]]:
    """The wallpapers as RGB images no larger than ``max_side``, undecodable ones skipped.

    The packages ship one picture at several resolutions and in light/dark variants; with
    ``distinct`` those are kept once (a grey 16 x 16 thumbnail correlating > 0.8 with one already
    kept is dropped), so the photographs are distinct pictures.
    """
    from .decode import BadImage, load_image

    photos: list[tuple[str, Image.Image]] = []
    thumbs: list[np.ndarray] = []
    for p in photograph_paths(roots):
        try:
            img = load_image(p, draft_size=max_side)
        except BadImage:
            continue
        f = max(img.size) / max_side
        if f > 1:
            img = img.resize((max(1, round(img.width / f)), max(1, round(img.height / f))), Image.Resampling.BOX)
        t = np.asarray(img.convert("L").resize((16, 16), Image.Resampling.BOX), np.float32).ravel()
        t -= t.mean()
        n = float(np.linalg.norm(t))
        if n < 1e-3:
            continue
        t /= n
        if distinct and any(float(t @ u) > 0.8 for u in thumbs):
            continue
        thumbs.append(t)
        photos.append((str(p), img))
        if limit and len(photos) >= limit:
            break
    return photos


@dataclass
class PileSpec:
    """How many images of each kind the pile holds (defaults: the benchmark's pile, 35,000 files)."""

    seed: int = 0
    in_domain: int = 17500  # Fashion-MNIST train images (distinct), Zipf over classes (head: 5,975 of 6,000)
    zipf: float = 1.0  # class c's share ~ 1 / (rank + 1) ** zipf
    off_domain: int = 7000  # grey 28-px crops of photographs
    noise: int = 875  # uniform noise
    blank: int = 875  # a flat grey level + faint noise
    dup_sources: int = 350  # images (of all kinds above) that get near-duplicates
    dup_copies: int = 8750  # near-duplicate copies in all, spread heavy-tailed over the sources
    dup_max: int = 400  # the largest group's copies
    jpeg_share: float = 0.3  # share of the originals stored as JPEG (quality 75-95), the rest PNG

    def total(self) -> int:
        return self.in_domain + self.off_domain + self.noise + self.blank + self.dup_copies


@dataclass
class PileItem:
    name: str
    kind: str  # in_domain, off_domain, noise, blank, near_duplicate
    label: int = -1  # Fashion-MNIST class (-1: none); a copy carries its source's
    group: int = -1  # duplicate group (the source's id) for sources and their copies, -1 otherwise
    source: str = ""  # what the image came from (fmnist:train:i, a photograph path, ...)
    transform: str = ""  # how a copy was made
    extra: dict = field(default_factory=dict)


def zipf_counts(n: int, classes: int, a: float, rng: random.Random) -> list[int]:
    """``n`` split over ``classes`` as 1 / (rank + 1) ** a, the ranks in a seeded order (sums to n)."""
    order = list(range(classes))
    rng.shuffle(order)
    w = np.array([1.0 / (order.index(c) + 1) ** a for c in range(classes)])
    raw = w / w.sum() * n
    counts = np.floor(raw).astype(int)
    for c in np.argsort(-(raw - counts))[: n - counts.sum()]:
        counts[c] += 1
    return counts.tolist()


def group_sizes(sources: int, copies: int, largest: int, rng: random.Random) -> list[int]:
    """Copies per source: heavy-tailed (Pareto), the largest ``largest``, summing to ``copies``."""
    if sources <= 0 or copies <= 0:
        return [0] * max(sources, 0)
    raw = np.array([rng.paretovariate(1.1) for _ in range(sources)])
    raw = raw / raw.max() * largest
    sizes = np.maximum(1, np.round(raw * copies / raw.sum())).astype(int)
    sizes[int(np.argmax(sizes))] = largest
    while sizes.sum() > copies:  # trim the others to the total, never below one
        i = int(rng.choice(np.nonzero(sizes > 1)[0].tolist()))
        if i != int(np.argmax(sizes)):
            sizes[i] -= 1
    while sizes.sum() < copies:
        sizes[rng.randrange(sources)] += 1
    return sizes.tolist()


def _encode(img: Image.Image, fmt: str, quality: int = 90) -> bytes:
    """The image's bytes, without the photograph's colour profile (an RGB profile in a grey PNG is
    invalid: libpng warns about it on every decode)."""
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=quality, icc_profile=None)
    else:
        img.save(buf, format="PNG", optimize=False, compress_level=6, icc_profile=None)
    return buf.getvalue()


def crop_area(img: Image.Image, area: float, rng: random.Random) -> Image.Image:
    """A crop keeping ``area`` of the picture, of random aspect and position (at least one pixel a side):
    the crop copy of every near-copy answer key (the piles here, bench/nearcopy.py, bench/photos.py)."""
    w = rng.uniform(area, 1.0)
    h = area / w
    if rng.random() < 0.5:
        w, h = h, w
    W, H = img.size
    x, y = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
    return img.crop((round(x * W), round(y * H), max(round(x * W) + 1, round((x + w) * W)),
                     max(round(y * H) + 1, round((y + h) * H))))


def near_copy(img: Image.Image, rng: random.Random, min_area: float = 0.8) -> tuple[Image.Image, str, int]:
    """A near-duplicate: some of crop (>= ``min_area``), flip, resize (0.5-2x) and re-encode.
    Returns (image, what was done, JPEG quality or 0 for PNG)."""
    did = []
    ops = rng.sample(["crop", "flip", "resize", "jpeg"], k=rng.randint(1, 4))
    if "crop" in ops:
        a = rng.uniform(min_area, 1.0)
        img = crop_area(img, a, rng)
        did.append(f"crop{a:.2f}")
    if "flip" in ops:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        did.append("flip")
    if "resize" in ops:
        s = rng.uniform(0.5, 2.0)
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.BILINEAR)
        did.append(f"resize{s:.2f}")
    q = rng.randint(30, 95) if "jpeg" in ops else 0
    if q:
        did.append(f"jpeg{q}")
    return img, "+".join(did), q


def _photo_crop(photo: Image.Image, rng: random.Random, side: int = 28) -> Image.Image:
    """A grey ``side``-px crop of a photograph: a random square of 5-60% of its shorter side."""
    W, H = photo.size
    s = max(side, round(min(W, H) * rng.uniform(0.05, 0.6)))
    x, y = rng.randrange(0, W - s + 1), rng.randrange(0, H - s + 1)
    return photo.crop((x, y, x + s, y + s)).convert("L").resize((side, side), Image.Resampling.BOX)


def near_blank(rng: np.random.Generator, side: int = 28) -> tuple[Image.Image, int]:
    """A near-blank image (grey ``L``) and its level: a flat grey level plus faint noise (1.5 levels)."""
    level = int(rng.integers(0, 256))
    arr = np.clip(level + rng.normal(0, 1.5, (side, side)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="L"), level


def build_pile(out: str | Path, spec: PileSpec | None = None, photos: list[tuple[str, Image.Image]] | None = None,
               fmnist_root: str | Path | None = None, progress: bool = False) -> dict:
    """Write the pile of ``spec`` into ``out`` (files, ``pile.csv``, ``pile.json``); returns the mix.

    ``photos`` (from :func:`load_photographs`) are loaded when not given; with none installed the
    off-domain share is refused with how to install them, unless ``spec.off_domain`` is 0.
    """
    from .collection import load_fashion_mnist

    spec = spec or PileSpec()
    out = Path(out)
    rng = random.Random(spec.seed)
    nrng = np.random.default_rng(spec.seed)
    if spec.off_domain and photos is None:
        photos = load_photographs(max_side=512)
    if spec.off_domain and not photos:
        raise PileError("no photographs found under /usr/share/backgrounds or /usr/share/wallpapers: install "
                        f"them (apt-get install {' '.join(WALLPAPER_PACKAGES)}) or set off_domain=0")
    images, labels = load_fashion_mnist("train", fmnist_root)
    lab = labels.numpy()
    per_class = zipf_counts(spec.in_domain, 10, spec.zipf, rng)
    items: list[tuple[PileItem, Image.Image, str, int]] = []  # (item, image, format, quality)
    for c in range(10):
        pool = np.nonzero(lab == c)[0].tolist()
        if per_class[c] > len(pool):
            raise PileError(f"class {c} has {len(pool)} train images; the pile asks {per_class[c]}")
        for i in sorted(rng.sample(pool, per_class[c])):
            img = Image.fromarray(images[i, 0].numpy(), mode="L")
            items.append((PileItem("", "in_domain", c, source=f"fashion-mnist:train:{i}"), img, "", 0))
    for _ in range(spec.off_domain):
        p = rng.randrange(len(photos or []))
        items.append((PileItem("", "off_domain", source=photos[p][0]), _photo_crop(photos[p][1], rng), "", 0))
    for _ in range(spec.noise):
        arr = nrng.integers(0, 256, (28, 28), dtype=np.uint8)
        items.append((PileItem("", "noise", source="uniform noise"), Image.fromarray(arr, mode="L"), "", 0))
    for _ in range(spec.blank):
        img, level = near_blank(nrng)
        items.append((PileItem("", "blank", source=f"grey {level}"), img, "", 0))
    for it in items:  # the originals' storage format
        jpeg = rng.random() < spec.jpeg_share
        it[0].extra["format"] = "jpg" if jpeg else "png"
    n_orig = len(items)
    sources = rng.sample(range(n_orig), min(spec.dup_sources, n_orig)) if spec.dup_copies else []
    sizes = group_sizes(len(sources), spec.dup_copies, spec.dup_max, rng)
    copies: list[tuple[PileItem, Image.Image, str, int]] = []
    for g, (src, k) in enumerate(zip(sources, sizes)):
        item, img, _, _ = items[src]
        item.group = g
        for _ in range(k):
            c, how, q = near_copy(img, rng)
            copies.append((PileItem("", "near_duplicate", item.label, g, item.source, how), c, "", q))
    allitems = items + copies
    order = list(range(len(allitems)))
    rng.shuffle(order)  # names do not tell the kind
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for pos, i in enumerate(order):
        item, img, _, q = allitems[i]
        ext = item.extra.get("format", "jpg" if q else "png")
        item.name = f"{pos // 1000:03d}/{pos:06d}.{ext}"
        quality = q or (rng.randint(75, 95) if ext == "jpg" else 0)
        data = _encode(img, "JPEG" if ext == "jpg" else "PNG", quality)
        (out / item.name).parent.mkdir(exist_ok=True)
        (out / item.name).write_bytes(data)
        rows.append(item)
    rows.sort(key=lambda r: r.name)
    with open(out / "pile.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["name", "kind", "label", "group", "source", "transform"])
        for r in rows:
            w.writerow([r.name, r.kind, r.label, r.group, r.source, r.transform])
    kinds: dict[str, int] = {}
    for r in rows:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
    mix = {"format": "openseer.pile.v1", "spec": asdict(spec), "files": len(rows), "kinds": kinds,
           "in_domain_per_class": per_class, "groups": len(sources), "group_sizes_top": sorted(sizes, reverse=True)[:10],
           "photographs": len(photos or []), "digest": pile_digest(out, [r.name for r in rows])}
    (out / "pile.json").write_text(json.dumps(mix, indent=1) + "\n")
    return mix


def pile_digest(out: Path, names: list[str]) -> str:
    """SHA-256 over every file's name and bytes, in name order (same seed -> same digest)."""
    h = hashlib.sha256()
    for n in sorted(names):
        h.update(n.encode() + b"\0" + (out / n).read_bytes())
    return h.hexdigest()[:16]


def read_answer_key(pile: str | Path) -> dict[str, dict]:
    """name -> row of ``pile.csv`` (kind, label, group, ...)."""
    with open(Path(pile) / "pile.csv", newline="") as f:
        return {r["name"]: r for r in csv.DictReader(f)}
