"""Shard writer: round trip (same bytes, same keys), duplicates, downscale, manifest + sidecar,
bad files by reason, nothing written outside --out, resume after an interruption, the report."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from openseer.commands import main
from openseer.data.decode import DataError
from openseer.data.shards import report, write_shards
from tests.data.corpus import write_corpus


def _photo(seed: int, size: tuple[int, int], fmt: str, **kw) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize(size, Image.BILINEAR)  # smooth, photo-like
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _pile(folder: Path, n: int = 12) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for i in range(n):
        name = f"sub{i % 3}/img{i:02d}." + ("jpg" if i % 2 else "png")
        data = _photo(i, (40 + i, 30), "JPEG" if i % 2 else "PNG")
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        files[name] = data
    return files


def _read_tar(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


def _manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_round_trip_same_bytes_same_keys_and_duplicates_dropped(tmp_path):
    files = _pile(tmp_path / "in")
    (tmp_path / "in" / "zz_copy.jpg").write_bytes(files["sub1/img01.jpg"])  # exact duplicate, later in order
    summary = write_shards(tmp_path / "in", tmp_path / "out", shard_size=5, workers=1)
    assert [s["samples"] for s in summary["shards"]] == [5, 5, 2]
    assert summary["counts"] == {"stored": 12, "skipped_duplicate": 1}
    rows = _manifest(tmp_path / "out")
    by_source = {r["source"]: r for r in rows}
    assert set(by_source) == set(files)
    stored = {}
    for shard in summary["shards"]:
        for name, data in _read_tar(tmp_path / "out" / shard["name"]):
            stored[name] = data
        assert hashlib.sha256((tmp_path / "out" / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
    for source, data in files.items():
        row = by_source[source]
        digest = hashlib.sha256(data).hexdigest()
        assert row["sha256"] == digest and row["key"] == digest[:32]
        ext = "jpg" if source.endswith(".jpg") else "png"
        assert stored[f"{row['key']}.{ext}"] == data  # byte for byte
        meta = json.loads(stored[f"{row['key']}.json"])
        assert meta["key"] == row["key"] and meta["width"] == int(row["width"])
        assert int(row["bytes"]) == len(data) and row["stored_format"] == ext
    skipped = list(csv.DictReader(open(tmp_path / "out" / "skipped.csv", encoding="utf-8")))
    assert skipped == [{"source": "zz_copy.jpg", "reason": "duplicate",
                        "detail": hashlib.sha256(files["sub1/img01.jpg"]).hexdigest()[:32]}]
    # deterministic: the same input gives byte-identical shards
    again = write_shards(tmp_path / "in", tmp_path / "out2", shard_size=5, workers=2)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in summary["shards"]]


def test_downscale_keeps_png_reencodes_jpeg_and_applies_exif(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "big.jpg").write_bytes(_photo(1, (1200, 800), "JPEG", quality=90))
    (src / "big.png").write_bytes(_photo(2, (300, 900), "PNG"))
    exif = Image.Exif()
    exif[0x0112] = 6
    (src / "rotated.jpg").write_bytes(_photo(3, (600, 200), "JPEG", exif=exif.tobytes()))
    (src / "small.jpg").write_bytes(_photo(4, (100, 80), "JPEG"))
    write_shards(src, tmp_path / "out", shard_size=10, max_side=256, workers=1)
    rows = {r["source"]: r for r in _manifest(tmp_path / "out")}
    members = dict(_read_tar(tmp_path / "out" / "000000.tar"))
    expect = {"big.jpg": ("jpg", (1200, 800), (256, 171)), "big.png": ("png", (300, 900), (85, 256)),
              "rotated.jpg": ("jpg", (200, 600), (85, 256)), "small.jpg": ("jpg", (100, 80), (100, 80))}
    for source, (ext, orig, new) in expect.items():
        r = rows[source]
        assert (int(r["width"]), int(r["height"])) == orig, source
        assert (int(r["stored_width"]), int(r["stored_height"])) == new, source
        img = Image.open(io.BytesIO(members[f"{r['key']}.{ext}"]))
        assert img.format == ("PNG" if ext == "png" else "JPEG") and img.size == new
    assert members[f"{rows['small.jpg']['key']}.jpg"] == (src / "small.jpg").read_bytes()


def test_bad_files_are_skipped_by_reason_and_nothing_is_written_outside_out(tmp_path):
    bad, good = write_corpus(tmp_path / "in")
    # a file list with odd entries: relative paths, '..', absolute paths, comments
    listing = tmp_path / "in" / "list.txt"
    names = sorted(set(bad) | set(good))
    text = "# my pile\n" + "\n".join(n for n in names if "\n" not in n) + "\n../in/photo.bmp\n"
    listing.write_bytes(os.fsencode(text))  # raw bytes: one name is not valid UTF-8
    before = sorted(p.name for p in tmp_path.iterdir())
    summary = write_shards(listing, tmp_path / "out", shard_size=7, workers=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "out"])
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert all(n.endswith(".tar") or n in ("manifest.csv", "skipped.csv", "index.json", "progress.json",
                                           ".openseer-index") for n in written)
    assert all(p.name == "index.json" or p.parent.name == "parts"  # the pile index: fixed names only
               for p in (tmp_path / "out" / ".openseer-index").rglob("*") if p.is_file())
    skipped = list(csv.DictReader(open(tmp_path / "out" / "skipped.csv", encoding="utf-8")))
    got = Counter(r["reason"] for r in skipped)
    want = Counter(bad.values())
    want["duplicate"] += 1  # ../in/photo.bmp is photo.bmp again
    assert got == want
    n_good = len([n for n in good if "\n" not in n])
    assert summary["total"] == n_good
    for shard in summary["shards"]:  # tar member names are content keys only
        for name, _ in _read_tar(tmp_path / "out" / shard["name"]):
            stem, ext = name.split(".")
            assert len(stem) == 32 and all(c in "0123456789abcdef" for c in stem) and "/" not in name
    (tmp_path / "evil").write_text("x")
    (tmp_path / "out3").mkdir()
    (tmp_path / "out3" / "manifest.csv").symlink_to(tmp_path / "evil")
    with pytest.raises(DataError, match="symlink"):
        write_shards(listing, tmp_path / "out3", shard_size=7, workers=1)
    assert (tmp_path / "evil").read_text() == "x"


def test_sidecar_columns_reach_the_manifest(tmp_path):
    files = _pile(tmp_path / "in", 4)
    side = tmp_path / "meta.csv"
    with open(side, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "source_url", "licence", "width"])
        for i, name in enumerate(files):
            w.writerow([name, f"https://example.org/{i}", "CC-BY-4.0", "999"])
    write_shards(tmp_path / "in", tmp_path / "out", shard_size=10, sidecar=side, workers=1)
    rows = _manifest(tmp_path / "out")
    assert all(r["licence"] == "CC-BY-4.0" and r["source_url"].startswith("https://") for r in rows)
    assert all(r["meta_width"] == "999" and r["width"] != "999" for r in rows)  # no clobbering


def test_interrupted_run_resumes_and_ends_identical(tmp_path):
    _pile(tmp_path / "in", 23)
    reference = write_shards(tmp_path / "in", tmp_path / "ref", shard_size=4, workers=1)

    class Stop(Exception):
        pass

    def stop_after_two(text: str) -> None:
        if text.startswith("000001.tar"):
            raise Stop

    with pytest.raises(Stop):
        write_shards(tmp_path / "in", tmp_path / "out", shard_size=4, workers=1, log=stop_after_two)
    out = tmp_path / "out"
    # what a crash in the middle of the third shard leaves: a partial tar, an uncommitted tar, torn rows
    (out / ".000002.tar.partial").write_bytes(b"half a tar")
    shutil.copy(out / "000001.tar", out / "000002.tar")
    with open(out / "manifest.csv", "a") as f:
        f.write("deadbeef,torn row")
    lines: list[str] = []
    summary = write_shards(tmp_path / "in", out, shard_size=4, workers=1, log=lines.append)
    assert lines[0].startswith("resuming: 2 shard(s) complete")
    assert [s["sha256"] for s in summary["shards"]] == [s["sha256"] for s in reference["shards"]]
    assert (out / "manifest.csv").read_bytes() == (tmp_path / "ref" / "manifest.csv").read_bytes()
    assert not list(out.glob(".*.partial"))
    # a finished folder re-run changes nothing; other settings are refused
    write_shards(tmp_path / "in", out, shard_size=4, workers=1)
    assert (out / "manifest.csv").read_bytes() == (tmp_path / "ref" / "manifest.csv").read_bytes()
    with pytest.raises(DataError, match="other settings"):
        write_shards(tmp_path / "in", out, shard_size=5, workers=1)


def test_cli_shard_and_report(tmp_path, capsys):
    _pile(tmp_path / "in", 6)
    (tmp_path / "in" / "empty.jpg").write_bytes(b"")
    assert main(["shard", str(tmp_path / "in"), "--out", str(tmp_path / "s"), "--shard-size", "4", "-q"]) == 0
    assert "6 images in 2 shard(s)" in capsys.readouterr().out
    assert main(["data", "report", str(tmp_path / "s"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["images"] == 6 and r["shards"] == 2 and r["skipped"] == {"empty": 1} and r["duplicates"] == 0
    assert r["formats"] == {"PNG": 3, "JPEG": 3}
    assert report(tmp_path / "s")["stored_bytes"] > 0
    assert main(["shard", str(tmp_path / "nope"), "--out", str(tmp_path / "t")]) == 2  # a person's error
    assert "does not exist" in capsys.readouterr().err


def test_default_shard_size_feeds_several_loader_slots_and_an_explicit_size_is_kept(tmp_path, capsys):
    from openseer.data.shards import auto_shard_size

    # even shards, up to 8, none under 256 images (one shard below that), none over 10,000
    assert [auto_shard_size(n) for n in (1, 149, 255, 520, 1024, 5000, 100_000)] == \
        [1, 149, 255, 260, 256, 625, 10_000]
    src = tmp_path / "pile"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(520):  # tiny distinct images: none is a duplicate of another
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(src / f"{i:03d}.png")
    assert main(["shard", str(src), "--out", str(tmp_path / "auto"), "--workers", "1", "-q"]) == 0
    index = json.loads((tmp_path / "auto" / "index.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [260, 260]
    assert index["params"]["shard_size"] == 260
    assert "520 images in 2 shard(s)" in capsys.readouterr().out
    assert main(["shard", str(src), "--out", str(tmp_path / "fixed"), "--shard-size", "400", "--workers", "1", "-q"]) == 0
    index = json.loads((tmp_path / "fixed" / "index.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [400, 120]
    assert index["params"]["shard_size"] == 400
    # re-run without --shard-size on a folder written with one (e.g. the old default): the recorded size is kept
    assert main(["shard", str(src), "--out", str(tmp_path / "fixed"), "--workers", "1", "-q"]) == 0
    assert [s["samples"] for s in json.loads((tmp_path / "fixed" / "index.json").read_text())["shards"]] == [400, 120]
