"""Near-copy takedowns: copies (re-encoded, resized, cropped, flipped) of a photo are found and never
reach a batch; unrelated images stay in."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from openseer.commands import main
from openseer.data import nearcopy as nc
from openseer.data.batches import iterate_batches
from openseer.data.collection import open_collection
from openseer.data.pile import load_photographs, photograph_paths
from openseer.data.takedown import DenyList
from tests.conftest import tiny_config


def photo(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A synthetic 'photograph': a smooth random field with random shapes on it."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)).resize(
        size, Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(3))
    d = ImageDraw.Draw(base)
    for _ in range(25):
        x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
        r = int(rng.integers(5, 40))
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)((x - r, y - r, x + r, y + r), fill=col)
    return base


def jpeg(img: Image.Image, q: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def copies(img: Image.Image) -> dict[str, Image.Image]:
    W, H = img.size
    return {
        "jpeg30": jpeg(img, 30),
        "jpeg95": jpeg(img, 95),
        "scale25": img.resize((W // 4, H // 4), Image.Resampling.BILINEAR),
        "crop70": img.crop((int(0.3 * W), 0, W, H)),  # 70% of the area, off-centre
        "crop84": img.crop((int(0.05 * W), int(0.11 * H), int(0.89 * W), int(0.95 * H))),
        "flip": img.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "all": jpeg(img.crop((10, 20, W - 30, H - 5)).transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize(
            (W // 3, H // 3), Image.Resampling.BILINEAR), 40),
    }


def test_the_window_grid_covers_every_crop_keeping_70_percent():
    g = nc.GRID
    assert (0.0, 0.0, 1.0, 1.0) in g and all(w * h >= nc.MIN_SIDE - 1e-9 for _, _, w, h in g)
    assert all(x + w <= 1 + 1e-9 and y + h <= 1 + 1e-9 for x, y, w, h in g)
    rng = np.random.default_rng(0)
    n = 0
    while n < 200:  # any crop keeping >= 70% of the area is within half a step of a window (the
        w, h = rng.uniform(0.7, 1), rng.uniform(0.7, 1)  # verification's local search does the rest)
        if w * h < 0.7:
            continue
        n += 1
        x, y = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
        d = min(max(abs(x - a), abs(y - b), abs(w - c), abs(h - e)) for a, b, c, e in g)
        assert d <= nc.CROP_STEP / 2 + 0.01
    assert nc.describe(Image.new("L", (50, 40), 128)) is None  # flat: never matched


def test_copies_are_found_and_unrelated_images_are_not():
    target, other = photo(1), photo(2)
    pile = list(copies(target).values()) + [other, *copies(other).values()] + [photo(s) for s in range(3, 9)]
    vecs = [nc.describe(im) for im in pile]
    index = nc.CopyIndex(np.stack(vecs))
    found = {r for r, _, _ in nc.find_copies(nc.describe_query(target), index, lambda r: pile[r])}
    assert found == set(range(len(copies(target))))


def _verify_one(query: nc.Query, row: int, candidate: Image.Image) -> float:
    """The verification written out for one candidate, box by box: the batched search must equal it."""
    f, v = nc.target(candidate)
    view_i, box = query.windows[row]
    view = query.views[view_i]
    W, H = view.size

    def pixels(b):
        x0, y0, x1, y1 = max(0.0, b[0]), max(0.0, b[1]), min(1.0, b[0] + b[2]), min(1.0, b[1] + b[3])
        return None if x1 - x0 < 0.05 or y1 - y0 < 0.05 else (x0 * W, y0 * H, x1 * W, y1 * H)

    if not f.any():
        if v is None or nc.fine(view, pixels(box)) is not None:
            return -1.0
        ref, describe = v, nc._vector
    else:
        ref, describe = f, nc.fine

    def score(b):
        d = describe(view, pixels(b)) if pixels(b) is not None else None
        return -1.0 if d is None else float(d @ ref)

    best, step = score(box), nc.CROP_STEP / 2
    for _ in range(3):
        moved = True
        while moved:
            moved = False
            for k in range(4):
                for sign in (-1, 1):
                    b = list(box)
                    b[k] += sign * step
                    c = score(tuple(b))
                    if c > best:
                        best, box, moved = c, tuple(b), True
        step /= 2
    return best


def test_the_batched_verification_equals_one_candidate_at_a_time():
    target, smooth = photo(1), Image.fromarray(np.tile(np.linspace(40, 90, 96, dtype=np.float32), (64, 1))
                                               .astype(np.uint8)).convert("RGB")
    pile = [*copies(target).values(), *copies(photo(2)).values(), photo(3), smooth, jpeg(smooth, 50)]
    query = nc.describe_query(target)
    cands = nc.CopyIndex(np.stack([nc.describe(im) for im in pile])).candidates(query, threshold=-1.0)
    rows = np.array([cands[i][1] for i in range(len(pile))])  # each one's closest window
    fines, vecs = zip(*(nc.target(im) for im in pile))
    vecs = [np.zeros(nc.SIDE ** 2, np.float32) if v is None else v for v in vecs]
    scores, flat = query.verify_many(rows, np.stack(fines), np.stack(vecs))
    want = [_verify_one(nc.describe_query(target), int(r), im) for r, im in zip(rows, pile)]
    np.testing.assert_allclose(scores, want, atol=1e-5)
    assert flat.tolist() == [not f.any() for f in fines] and flat[-2:].all() and scores[:7].min() > 0.5


def test_near_takedown_keeps_every_copy_out_of_every_batch(tmp_path, capsys):
    pile = tmp_path / "pile"
    pile.mkdir()
    target = photo(11)
    names = []
    for k, im in copies(target).items():
        (pile / f"copy_{k}.png").write_bytes(_png(im))
        names.append(f"copy_{k}.png")
    unrelated = ["other.png"] + [f"x{i}.png" for i in range(9)]
    (pile / "other.png").write_bytes(_png(photo(12)))
    for i in range(9):
        (pile / f"x{i}.png").write_bytes(_png(photo(20 + i).resize((64, 48))))
    (pile / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")  # counted, not a crash
    (tmp_path / "photo.jpg").write_bytes(_jpeg_bytes(target))
    lst = pile / "takedowns.txt"
    assert main(["takedown", "add", str(tmp_path / "photo.jpg"), "--near", "--list", str(lst), "-q"]) == 0
    out = capsys.readouterr().out
    assert f"{len(names)} near copies" in out
    deny = DenyList.load(lst)
    assert all(deny.denies(n) for n in names) and not any(deny.denies(n) for n in unrelated)
    assert "near copy of photo.jpg" in lst.read_text()
    # the reader honours it: no copy in any batch of three epochs, every unrelated image in
    cfg = tiny_config("data.batch_size=4", "data.num_workers=0")
    src = open_collection(str(pile), data_cfg=cfg.data)
    seen: set[str] = set()
    for batch in iterate_batches(src, cfg, 0, 1, 0, 12):
        seen |= set(batch.keys)
    assert not seen & set(names)
    assert set(unrelated) <= seen
    # check --near lists them, all deny-listed
    assert main(["takedown", "check", str(tmp_path / "photo.jpg"), "--near", "--pile", str(pile), "--json",
                 "-q"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(Path(c["path"]).name for c in doc["copies"]) == sorted(names)
    assert all(c["denied"] for c in doc["copies"])


def test_near_takedown_needs_a_photo(tmp_path, capsys):
    assert main(["takedown", "add", "--near", "--list", str(tmp_path / "t.txt")]) != 0
    assert "nothing to add" in capsys.readouterr().err
    assert not (tmp_path / "t.txt").exists()


@pytest.mark.skipif(not photograph_paths(), reason="no wallpapers installed (apt-get install gnome-backgrounds)")
def test_wallpapers_load_as_distinct_photographs():
    photos = load_photographs(max_side=128, limit=2)
    assert len(photos) == 2 and all(max(im.size) <= 128 for _, im in photos)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def test_near_takedown_on_shards_keeps_copies_out_of_the_stream(tmp_path, capsys):
    from openseer.data.shards import write_shards

    src = tmp_path / "in"
    src.mkdir()
    target = photo(31)
    for k, im in copies(target).items():
        (src / f"copy_{k}.png").write_bytes(_png(im))
    for i in range(9):
        (src / f"x{i}.png").write_bytes(_png(photo(40 + i).resize((80, 60))))
    write_shards(src, tmp_path / "shards", shard_size=4, workers=1)
    (tmp_path / "photo.png").write_bytes(_png(target))
    lst = tmp_path / "shards" / "takedowns.txt"
    assert main(["takedown", "add", str(tmp_path / "photo.png"), "--near", "--list", str(lst), "-q"]) == 0
    assert f"{len(copies(target))} near copies" in capsys.readouterr().out
    cfg = tiny_config("data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=4")
    seen: set[str] = set()
    for batch in iterate_batches(open_collection(str(tmp_path / "shards"), data_cfg=cfg.data), cfg, 0, 1, 0, 8):
        seen |= set(batch.keys)
    import csv

    with open(tmp_path / "shards" / "manifest.csv", newline="") as f:
        source = {r["key"]: r["source"] for r in csv.DictReader(f)}
    seen_names = {source[k.split(":")[-1]] if k.split(":")[-1] in source else k for k in seen}
    assert not any(n.startswith("copy_") for n in seen_names), seen_names
    assert {f"x{i}.png" for i in range(9)} <= seen_names


def test_detail_free_photos_are_matched_by_their_descriptor_alone():
    yy, xx = np.mgrid[0:200, 0:300].astype(np.float32)
    smooth = Image.fromarray((60 + 0.4 * xx + 0.2 * yy + 40 * np.exp(-((xx - 200) ** 2 + (yy - 80) ** 2) / 3000))
                             .clip(0, 255).astype(np.uint8)).convert("RGB")
    other = Image.fromarray((200 - 0.5 * yy + 0.1 * xx).clip(0, 255).astype(np.uint8)).convert("RGB")
    assert nc.fine(nc.prepare_image(smooth)) is None  # no detail for the high-pass check
    pile = [jpeg(smooth.resize((150, 100)), 40), smooth.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
            smooth.crop((40, 13, 300, 200)), other]  # the crop keeps 81% and falls between grid windows
    index = nc.CopyIndex(np.stack([nc.describe(im) for im in pile]))
    found = {r for r, _, _ in nc.find_copies(nc.describe_query(smooth), index, lambda r: pile[r])}
    assert found == {0, 1, 2}


def test_dark_low_contrast_photos_are_described_and_their_copies_found():
    # a dark photo with a few grey levels of relief (10-32; the wallpaper set's 'Kay' dark variant
    # spans 10-25): rounded to whole levels at 16 x 16 it used to count as flat (spread 2.6 < 4), so
    # no copy of it was ever matched. It has no detail for the high-pass check either, so the
    # detail-free rule decides (refined 16 x 16 cosine >= 0.98): every copy but the combined one
    # (crop + flip + a third of the size + JPEG 40 at once), which that rule does not reach.
    def dark(seed: int) -> Image.Image:
        x = np.asarray(photo(seed).convert("L"), np.float32)
        return Image.fromarray((10 + x * 22 / 255).round().astype(np.uint8)).convert("RGB")

    target = dark(1)
    made = copies(target)
    blank = [Image.fromarray(np.clip(14 + np.random.default_rng(s).normal(0, 1.5, (64, 64)), 0, 255)
                             .astype(np.uint8)) for s in range(20)]
    pile = list(made.values()) + [dark(s) for s in range(2, 8)] + blank
    vecs = [nc.describe(im) for im in pile]
    assert all(v is not None for v in vecs[:len(made)])
    keep = [i for i, v in enumerate(vecs) if v is not None]
    index = nc.CopyIndex(np.stack([vecs[i] for i in keep]))
    found = {keep[r] for r, _, _ in nc.find_copies(nc.describe_query(target), index, lambda r: pile[keep[r]])}
    assert found == {i for i, name in enumerate(made) if name != "all"}


def test_a_pile_whose_mirror_image_is_flat_still_indexes_with_flips(tmp_path):
    # PIL's 28 -> 16 box resize is not mirror-symmetric, so a near-blank image can be described one
    # way round and be flat the other (the uncurated bench's pile held four such images).
    r = np.random.default_rng(14)
    x = np.full((28, 28), 200.0) + r.normal(0, 0.5, (28, 28))
    x[:, :3] += r.uniform(0.5, 3)
    img = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert nc.describe(img) is not None
    assert nc.describe(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)) is None
    pile = tmp_path / "pile"
    pile.mkdir()
    img.save(pile / "edge.png")
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (28, 28), dtype=np.uint8)).save(pile / "noise.png")
    index = nc.PileIndex(str(pile), progress=False, flips=True)
    assert index.vectors.shape == index.flipped.shape == (2, nc.SIDE * nc.SIDE)
    assert np.isfinite(index.flipped).all()
