"""The decode cache (data.decode_cache): small copies of large images kept in the pile index, read by
the training loader instead of the originals; never stale, deny-list honoured, 16-bit kept, bad
files counted as without it."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from openseer.commands import main
from openseer.data import collection as col
from openseer.data import index as ix
from openseer.data.batches import iterate_batches
from openseer.data.collection import open_collection
from openseer.data.decode import BadImage
from openseer.data.denylist import content_key
from openseer.train.checkpoint import latest_checkpoint
from tests.conftest import FAST, QUIET, png_bytes, tiny_config


def _photo(seed: int, size=(240, 160)) -> bytes:
    """A smooth colour picture (gradients and a disc), as PNG bytes."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(0.5, 3.0, 3)
    img = np.stack([128 + 100 * np.sin(x / w * a * 6), 128 + 100 * np.cos(y / h * b * 6),
                    255 * ((x - w * c / 4) ** 2 + (y - h / 2) ** 2 < (h / 3) ** 2)], -1)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _pile(root: Path, big: int = 6) -> Path:
    """``big`` images larger than the tiny recipe's side (96), 3 small ones, a truncated file."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(big):
        (root / f"big{i}.png").write_bytes(_photo(i))
    for i in range(3):
        (root / f"small{i}.png").write_bytes(png_bytes(i, (40, 30)))
    good = png_bytes(9, (200, 150))
    (root / "cut.png").write_bytes(good[: len(good) // 2])
    return root


def _cfg(folder: Path, *extra: str):
    return tiny_config(f"data.source={folder}", "data.batch_size=4", *extra)


def _count_reads(monkeypatch) -> list[str]:
    """Every original file the collection reads (its bounded read), by name."""
    reads: list[str] = []
    real = col.read_bytes
    monkeypatch.setattr(col, "read_bytes", lambda path, timeout=None: reads.append(Path(path).name)
                        or real(path, timeout))
    return reads


def _batches(coll, cfg, steps: int = 4) -> list:
    return list(iterate_batches(coll, cfg, 0, 1, 0, steps))


def test_the_cache_is_built_then_used_and_no_large_original_is_decoded(tmp_path, monkeypatch):
    folder = _pile(tmp_path / "pile")
    cfg = _cfg(folder)
    coll = open_collection(str(folder), data_cfg=cfg.data)
    resolved, note = ix.prepare_decode_cache(cfg, coll, progress=False)
    assert (resolved.data.decode_cache, resolved.data.decode_cache_side) == ("on", 96)  # tiny-cpu crops: 96 px
    assert cfg.data.decode_cache == "auto"  # the caller's config is left as it was
    assert "decode cache: 6 of 10 images read from copies of at most 96 px" in note and "decoded now 10" in note
    doc = json.loads((folder / ix.INDEX_DIR / ix.MANIFEST).read_text())
    assert [p["pixels"] for p in doc["parts"]] == [{"96": 6}]
    copy = ix.read_copies(folder / ix.INDEX_DIR, doc["parts"][0]["id"], 96)
    assert copy[0].is_file() and (copy[1][:, 1] >= 0).sum() == 6

    reads = _count_reads(monkeypatch)
    cached = _batches(coll, resolved)
    assert reads and not [r for r in reads if r.startswith("big")]  # only small or bad files read as themselves
    assert max(im.size[0] for im in [coll.load(0)]) == 96
    # bad files are counted with the reasons they have without the cache, the same keys in the same batches
    coll_off = open_collection(str(folder), data_cfg=cfg.data)
    plain = _batches(coll_off, resolved)
    assert [b.keys for b in cached] == [b.keys for b in plain]
    assert [b.bad for b in cached] == [b.bad for b in plain] and any(b.bad for b in cached)
    assert {r for b in cached for _, r in b.bad} == {"truncated"}
    # a second run decodes nothing again: every image is reused
    again, note = ix.prepare_decode_cache(cfg, open_collection(str(folder), data_cfg=cfg.data), progress=False)
    assert "decoded now 0, reused 10" in note


def test_auto_is_off_for_small_images_fashion_mnist_and_when_asked(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    for i in range(4):
        (small / f"s{i}.png").write_bytes(png_bytes(i, (40, 30)))
    for folder, setting in ((small, "auto"), (_pile(tmp_path / "pile"), "off")):
        cfg = _cfg(folder, f"data.decode_cache={setting}")
        coll = open_collection(str(folder), data_cfg=cfg.data)
        resolved, note = ix.prepare_decode_cache(cfg, coll, progress=False)
        assert resolved.data.decode_cache == setting and note == "" and coll.pixels is None
        assert not (folder / ix.INDEX_DIR).exists()
    fm = tiny_config("data.decode_cache=on")  # YAML's on is true: read as on
    assert fm.data.decode_cache == "on"
    resolved, note = ix.prepare_decode_cache(fm, open_collection("fashion-mnist"), progress=False)
    assert resolved.data.decode_cache == "on" and "not a folder or a file list; no decode cache" in note


def test_a_changed_file_is_read_as_itself_then_copied_again(tmp_path, monkeypatch):
    folder = _pile(tmp_path / "pile")
    cfg = _cfg(folder)
    coll = open_collection(str(folder), data_cfg=cfg.data)
    resolved, _ = ix.prepare_decode_cache(cfg, coll, progress=False)
    row = [e.name for e in coll.entries].index("big2.png")
    time.sleep(0.01)
    (folder / "big2.png").write_bytes(_photo(77, size=(300, 120)))  # another picture, another shape
    reads = _count_reads(monkeypatch)
    img = coll.load(row)
    assert reads == ["big2.png"] and img.size == (300, 120)  # the original, never the stale copy
    resolved, note = ix.prepare_decode_cache(cfg, open_collection(str(folder), data_cfg=cfg.data), progress=False)
    assert "decoded now 1, reused 9" in note
    fresh = open_collection(str(folder), data_cfg=cfg.data)
    fresh.pixels = ix.open_pixels(fresh, 96)
    reads.clear()
    assert fresh.load(row).size == (96, 38) and reads == []
    (folder / "big3.png").unlink()  # gone: read as itself, so counted unreadable as without the cache
    with pytest.raises(BadImage) as e:
        fresh.load([x.name for x in fresh.entries].index("big3.png"))
    assert e.value.reason == "unreadable"


def test_sixteen_bit_images_keep_their_depth(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    y, x = np.mgrid[0:200, 0:300]
    deep = (x * 200 + y * 7).astype(np.uint16)  # values up to 60,000: beyond 8 bits
    Image.fromarray(deep).save(folder / "scan.png")
    Image.fromarray(deep[::-1].copy()).save(folder / "scan2.png")
    cfg = _cfg(folder, "model.in_chans=1", "data.decode_cache=on")
    coll = open_collection(str(folder), data_cfg=cfg.data, channels=1)
    ix.prepare_decode_cache(cfg, coll, progress=False)
    doc = json.loads((folder / ix.INDEX_DIR / ix.MANIFEST).read_text())
    store, where = ix.read_copies(folder / ix.INDEX_DIR, doc["parts"][0]["id"], 96)
    o, n = where[0]
    with Image.open(io.BytesIO(store.read_bytes()[o:o + n])) as im:
        assert im.mode == "I;16" and im.size == (96, 64)
    got = np.asarray(coll.load(0))  # F in [0, 1] from the 16-bit copy
    want = np.asarray(Image.fromarray(deep.astype(np.float32) / 65535).resize((96, 64), Image.Resampling.LANCZOS))
    assert np.abs(got - want).max() < 2e-3  # 8 bits would be off by up to 1/255 = 4e-3
    assert len(np.unique(np.round(got * 65535))) > 256  # more levels than 8 bits hold


def test_the_deny_list_keeps_taken_down_images_from_the_model(tmp_path, monkeypatch):
    folder = _pile(tmp_path / "pile")
    cfg = _cfg(folder)
    coll = open_collection(str(folder), data_cfg=cfg.data)
    resolved, _ = ix.prepare_decode_cache(cfg, coll, progress=False)
    names = [e.name for e in coll.entries]
    key = content_key((folder / "big1.png").read_bytes())
    (folder / "takedowns.txt").write_text(f"{key}\nbig4.png\n")  # by content key and by name
    later = open_collection(str(folder), data_cfg=cfg.data)
    later.pixels = ix.open_pixels(later, 96)
    assert later.pixels.stored == 6  # the copies are still there ...
    reads = _count_reads(monkeypatch)
    for name in ("big1.png", "big4.png"):
        with pytest.raises(BadImage) as e:
            later.load(names.index(name))
        assert e.value.reason == "denied"
    assert reads == []  # ... and refused from the copy, by the original's content key and name
    seen = {k for b in _batches(later, resolved, steps=6) for k in b.keys}
    assert seen and not seen & {"big1.png", "big4.png"}
    # the next run's build removes their copies from the store
    before = b"".join(p.read_bytes() for p in (folder / ix.INDEX_DIR / "parts").glob("*.px96.bin"))
    copy_of_big1 = later.pixels.read(names.index("big1.png"), folder / "big1.png", 5.0)
    assert copy_of_big1 and copy_of_big1 in before
    _, note = ix.prepare_decode_cache(cfg, open_collection(str(folder), data_cfg=cfg.data), progress=False)
    assert "; 2 copies of images on the deny-list removed" in note and "4 of 10 images read from copies" in note
    after = b"".join(p.read_bytes() for p in (folder / ix.INDEX_DIR / "parts").glob("*.px96.bin"))
    assert copy_of_big1 not in after and len(after) < len(before)
    assert later.load(names.index("big0.png")).size == (240, 160)  # a run holding the old offsets: the original
    # a build under this deny-list makes no new copy of a taken-down image
    ix.build_index(str(folder), index=tmp_path / "other", progress=False, pixels=96)
    other = open_collection(str(folder), data_cfg=cfg.data)
    other.pixels = ix.open_pixels(other, 96, index=tmp_path / "other")
    assert other.pixels.stored == 4
    assert other.pixels.length[names.index("big1.png")] < 0 and other.pixels.length[names.index("big4.png")] < 0


def test_index_pixels_adds_copies_to_an_index_and_keeps_them_when_rows_drop(tmp_path, capsys):
    folder = _pile(tmp_path / "pile")
    assert main(["index", str(folder), "-q"]) == 0  # descriptors only
    assert main(["index", str(folder), "--pixels", "64", "-q"]) == 0  # copies added to the kept part
    out = capsys.readouterr().out
    assert "described now 0" in out and "decode cache: 6 copies of at most 64 px (made now 6)" in out
    before = open_collection(str(folder))
    before.pixels = ix.open_pixels(before, 64)
    first = before.load(0).copy()
    (folder / "small0.png").unlink()  # a row dropped: its part rewritten, the copies carried over
    assert main(["index", str(folder), "--pixels", "64", "-q"]) == 0
    assert "made now 0" in capsys.readouterr().out
    after = open_collection(str(folder))
    after.pixels = ix.open_pixels(after, 64)
    assert after.pixels.stored == 6 and np.array_equal(np.asarray(after.load(0)), np.asarray(first))
    assert sorted(p.name for p in (folder / ix.INDEX_DIR / "parts").iterdir() if ".px" in p.name) == [
        "000001.px64.bin", "000001.px64.npy"]
    shards = tmp_path / "shards"
    from openseer.data.shards import write_shards

    write_shards(folder, shards, shard_size=4, workers=1)
    assert main(["index", str(shards), "--pixels", "64", "-q"]) == 2
    assert "--pixels (the decode cache) is for a folder or a file list" in capsys.readouterr().err


def _weights(run: Path) -> dict:
    return latest_checkpoint(run)[1]["model"]


def test_pretrain_from_the_cache_records_it_and_resumes_bit_exact(tmp_path, capsys):
    folder = _pile(tmp_path / "pile", big=8)
    args = ["--data", str(folder), *FAST, *QUIET, "data.batch_size=4", "optim.epochs=2", "log.every=1"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(["pretrain", "--out", str(whole), *args]) == 0
    out = capsys.readouterr().out
    assert "openseer: decode cache: 8 of 12 images read from copies of at most 96 px" in out
    assert "the decode cache reads them as copies of at most 96 px (data.decode_cache)" in out  # not "decoded every epoch"
    saved = (whole / "config.yaml").read_text()
    assert "decode_cache: 'on'" in saved and "decode_cache_side: 96" in saved
    assert main(["pretrain", "--out", str(parts), "--max-steps", "2", *args]) == 0
    assert main(["pretrain", "--resume", str(parts)]) == 0
    assert "decoded now 0, reused 12" in capsys.readouterr().out
    a, b = _weights(whole), _weights(parts)
    assert latest_checkpoint(whole)[1]["step"] == latest_checkpoint(parts)[1]["step"] == 6
    for k, v in a.items():
        assert torch.equal(v, b[k]), k
    assert os.path.isdir(folder / ix.INDEX_DIR)


RANKS_SCRIPT = """
import sys
import torch.distributed as dist
from openseer.data import index as ix
from openseer.data.collection import open_collection
from tests.conftest import tiny_config

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
folder, out = sys.argv[1], sys.argv[2]
ix.build_index(folder, index=out, progress=False, ranks=ix.DistRanks(rank, world), pixels=64, files_per_part=3)
cfg = tiny_config(f"data.source={folder}")
coll = open_collection(folder, data_cfg=cfg.data)
resolved, note = ix.prepare_decode_cache(cfg, coll, rank, world, progress=False)
print(f"rank {rank}: {resolved.data.decode_cache} {coll.pixels.stored}")
dist.destroy_process_group()
"""


@pytest.mark.heavy
def test_two_ranks_build_the_cache_one_process_builds(tmp_path):
    """A training run's ranks (``DistRanks`` over its process group) share the parts of the build:
    the copies and the manifest are byte for byte those of one process, and both ranks read them."""
    from tests.use.test_ranks import _torchrun

    folder = _pile(tmp_path / "pile", big=7)
    script = tmp_path / "build.py"
    script.write_text(RANKS_SCRIPT)
    done = _torchrun(str(folder), str(tmp_path / "two"), script=str(script))
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(line for line in done.stdout.splitlines() if line.startswith("rank")) == [
        "rank 0: on 7", "rank 1: on 7"]
    ix.build_index(str(folder), index=tmp_path / "one", progress=False, pixels=64, files_per_part=3)
    a, b = (json.loads((tmp_path / d / ix.MANIFEST).read_text()) for d in ("one", "two"))
    a.pop("updated_utc"), b.pop("updated_utc")
    assert a == b and len(a["parts"]) == 4 and all(p["pixels"] for p in a["parts"])
    names = sorted(p.name for p in (tmp_path / "one" / "parts").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two" / "parts").iterdir()) and any(".px64." in n for n in names)
    for name in names:
        assert (tmp_path / "one" / "parts" / name).read_bytes() == (tmp_path / "two" / "parts" / name).read_bytes()


def test_the_hostile_collection_through_the_cache_gives_every_row_its_reason(tmp_path):
    """Every row of the hostile pile (bad files of every kind, odd names, a deny-listed image) loads,
    or fails with its reason, the same with the cache as without it; the taken-down image gets no copy."""
    from tests.data.hostile import write_hostile

    hostile = write_hostile(tmp_path / "pile")
    r = ix.build_index(str(hostile.root), progress=False, log=lambda t: None, pixels=16)
    assert r["stored"] > 0 and r["rows"] == hostile.n_files

    def outcomes(coll) -> list[str]:
        out = []
        for i in range(len(coll)):
            try:
                out.append("ok" if coll.load(i) is not None else "none")
            except BadImage as e:
                out.append(e.reason)
        return out

    plain = open_collection(str(hostile.root))
    cached = open_collection(str(hostile.root))
    cached.pixels = ix.open_pixels(cached, 16)
    assert outcomes(cached) == outcomes(plain)
    assert outcomes(plain).count("denied") == 1
    denied = [e.key for e in cached.entries].index("a/taken_down.png")
    assert cached.pixels.length[denied] < 0
