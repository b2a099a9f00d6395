"""bench/photos.py: the split pile, the copies, the scores, the SwAV loader, and small end-to-end runs
on generated photographs (the Debian wallpapers are the bench's own pile; these need none)."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["crops.sizes=[32,16]", "model.head_hidden=[32]", "swav.n_prototypes=8", "data.num_workers=0"]


def _bench():
    spec = importlib.util.spec_from_file_location("photos_bench", ROOT / "bench" / "photos.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _photos(folder: Path, n: int = 10, size: tuple[int, int] = (160, 120)) -> Path:
    """``n`` distinct smooth colour pictures (a random 5 x 5 RGB field, bicubic-upsampled, faint noise),
    JPEG and PNG in turn: enough structure to be told apart, nothing shared between them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        grid = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8))
        x = np.asarray(grid.resize(size, Image.Resampling.BICUBIC), np.float32) + rng.normal(0, 2, (size[1], size[0], 3))
        img = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))
        img.save(folder / f"p{i:02d}.{'jpg' if i % 2 else 'png'}", quality=95)
    return folder


def test_copies_of_each_kind_do_what_they_say():
    bench = _bench()
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 300, 3), dtype=np.uint8))
    rng = random.Random(0)
    for _ in range(5):
        jpeg, how = bench.make_copy(img, "jpeg", rng)
        assert jpeg.format == "JPEG" and jpeg.size == img.size and 30 <= int(how[4:]) <= 90
        small, _ = bench.make_copy(img, "resize", rng)
        assert 0.25 * 300 - 1 <= small.width <= 0.5 * 300 + 1 and abs(small.width / small.height - 1.5) < 0.05
        crop, how = bench.make_copy(img, "crop", rng)
        area = crop.width * crop.height / (300 * 200)
        assert 0.45 <= area <= 0.95 and abs(area - float(how[4:])) < 0.05
        colour, how = bench.make_copy(img, "colour", rng)
        assert colour.size == img.size and "hue" in how
        assert np.abs(np.asarray(colour, np.float32) - np.asarray(img, np.float32)).mean() > 1
    a = [bench.make_copy(img, k, random.Random(3))[1] for k in bench.KINDS]
    assert a == [bench.make_copy(img, k, random.Random(3))[1] for k in bench.KINDS]  # seeded
    with pytest.raises(ValueError, match="unknown copy kind"):
        bench.make_copy(img, "flip", rng)


def test_ranks_are_faiss_cosine_ranks_and_scores_by_hand():
    bench = _bench()
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(50, 16)).astype(np.float32)
    truth = rng.integers(0, 50, 30)
    queries = gallery[truth] * rng.uniform(0.5, 3, (30, 1)) + rng.normal(0, 1.0, (30, 16)).astype(np.float32)
    got = bench.ranks(gallery, queries, truth)
    g, q = bench.unit(gallery), bench.unit(queries)
    sims = q @ g.T
    want = (sims > sims[np.arange(30), truth][:, None]).sum(1) + 1  # brute force: how many score higher, + 1
    assert np.array_equal(got, want) and (got >= 1).all() and (got > 1).any()
    # four queries of two kinds ranked 1, 2, 1, 4: recall@1 50%, mAP (1 + 1/2 + 1 + 1/4) / 4
    s = bench.scores(np.array([1, 2, 1, 4]), ["jpeg", "jpeg", "crop", "crop"])
    assert s["recall_at_1"] == 50.0 and s["map"] == round(100 * 2.75 / 4, 2)
    assert s["by_kind"] == {"jpeg": {"recall_at_1": 50.0, "map": 75.0}, "crop": {"recall_at_1": 50.0, "map": 62.5}}


def test_pixels_are_centred_thumbnails_blind_to_brightness_scaling():
    bench = _bench()
    img = Image.fromarray(np.random.default_rng(2).integers(40, 200, (64, 96, 3), dtype=np.uint8))
    darker = Image.fromarray((np.asarray(img, np.float32) * 0.5).astype(np.uint8))
    x = bench.unit(bench.pixels([img, darker]))
    assert x.shape == (2, 32 * 32 * 3) and abs(float(bench.pixels([img]).mean())) < 1e-3
    assert float(x[0] @ x[1]) > 0.99


def test_split_is_written_once_by_picture_and_reused(tmp_path):
    bench = _bench()
    photos = _photos(tmp_path / "photos")
    work = tmp_path / "work"
    doc = bench.prepare(work, 0, 0.25, str(photos))
    pics = doc["pictures"]
    held = [p for p in pics if p["split"] == "held_out"]
    assert len(pics) == 10 and len(held) == 2 and all("train" not in p for p in held)
    train = sorted((work / "train").iterdir())
    assert len(train) == 8  # the train pictures' own files, byte for byte
    for p in pics:
        if "train" in p:
            assert (work / p["train"]).read_bytes() == Path(p["source"]).read_bytes()
        with Image.open(work / p["gallery"]) as im:
            assert im.format == "PNG" and im.size == (160, 120)
    before = (work / bench.MANIFEST).stat().st_mtime_ns
    assert bench.prepare(work, 0, 0.25, str(photos)) == doc and (work / bench.MANIFEST).stat().st_mtime_ns == before
    other = bench.prepare(tmp_path / "work2", 1, 0.25, str(photos))
    assert [p["split"] for p in other["pictures"]] != [p["split"] for p in pics]  # the seed picks the split
    with pytest.raises(bench.BenchError, match="another --work"):
        bench.prepare(work, 1, 0.25, str(photos))
    with pytest.raises(bench.BenchError, match="fewer than 8 distinct photographs"):
        bench.prepare(tmp_path / "work3", 0, 0.25, str(_photos(tmp_path / "few", n=3)))


def test_swav_loader_decodes_whole_files_into_the_recipes_crops(tmp_path):
    bench = _bench()
    photos = _photos(tmp_path / "photos", n=3)
    cfg = bench.config(SMALL, str(photos))
    ds = bench.SwAVMultiCrop(photos, cfg.crops)
    crops = ds[0]
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 4
    assert all(c.dtype.is_floating_point for c in crops) and float(crops[0].min()) < 0  # normalised
    assert bench.knows_decode_cache() in (True, False)


def test_retrieval_end_to_end_prints_one_json_line(tmp_path, capsys):
    """The whole retrieval part on a timm model with random weights (no pretraining): every set is
    scored, pixels find every re-encoded copy, the tiles join the gallery."""
    bench = _bench()
    photos = _photos(tmp_path / "photos")
    rc = bench.main(["--photos", str(photos), "--work", str(tmp_path / "w"), "--parts", "retrieval",
                     "--model", "regnetx_002", "--copies", "1", "--tiles", "5"])
    assert rc == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    r = line["retrieval"]
    assert line["bench"] == "photos" and r["queries"] == 2 * 4 and r["gallery"] == 15 and r["distractor_tiles"] == 5
    assert set(r["results"]) == {"openseer", "random_init", "pixels"}
    assert r["results"]["pixels"]["by_kind"]["jpeg"]["recall_at_1"] == 100.0
    for s in r["results"].values():
        assert 0 <= s["recall_at_1"] <= s["map"] <= 100
    assert r["openseer_minus_pixels"] == round(r["results"]["openseer"]["recall_at_1"]
                                               - r["results"]["pixels"]["recall_at_1"], 2)


@pytest.mark.heavy
def test_pretrain_and_step_times_end_to_end(tmp_path, capsys):
    """A few seconds of the recipe on the generated folder, its retrieval, and the step time of each path."""
    bench = _bench()
    photos = _photos(tmp_path / "photos", n=12)
    work = tmp_path / "w"
    args = ["--photos", str(photos), "--work", str(work), "--minutes", "0.05", "--copies", "1", "--tiles", "0",
            "--steps", "1", "--batch", "4", "--sets", "openseer,pixels", *SMALL]
    assert bench.main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1  # openseer's own lines went to stderr: stdout is the JSON line
    line = json.loads(out[0])
    assert line["pretrain"]["steps"] >= 1 and line["pretrain"]["run"] == str(work / "run-0.05m-seed0")
    assert set(line["retrieval"]["results"]) == {"openseer", "pixels"}
    st = line["step_time"]
    paths = [k for k in st["vs_shards"]]
    assert "shards_256" in paths and "swav_loader" in paths and any(k.startswith("folder") for k in paths)
    assert all(st[k]["s_per_step"] > 0 and st[k]["steps"] == 1 for k in paths)
    assert st["batch"] == 4 and st["workers"] == 0 and st["warmup_steps"] == 2 + 1  # 9 train pictures: 2 steps an epoch, + 1
    assert any(work.joinpath("shards256").glob("*.tar"))
    # run again: the split, the run (complete) and the shards are reused
    assert bench.main([*args, "--parts", "retrieval"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["pretrain"]["steps"] == line["pretrain"]["steps"]
