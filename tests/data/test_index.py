"""The pile index (openseer index): built once, extended, checked against its pile; takedown --near
answers from it as from a scan; approximate search against exact."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from openseer.commands import main
from openseer.data import index as ix
from openseer.data import nearcopy as nc
from openseer.data.search import VectorSearch, choose_kind, recall_against_exact
from tests.data.hostile import write_hostile
from tests.data.test_nearcopy import copies, photo

ROOT = Path(__file__).resolve().parents[2]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _pile(root: Path, target_seed: int = 11, others: int = 8) -> tuple[Path, list[str]]:
    """A folder: copies of photo(target_seed), unrelated photos, a flat and a broken file."""
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for k, im in copies(photo(target_seed)).items():
        (root / f"copy_{k}.png").write_bytes(_png(im))
        names.append(f"copy_{k}.png")
    for i in range(others):
        (root / f"x{i}.png").write_bytes(_png(photo(100 + i).resize((96, 72))))
    (root / "flat.png").write_bytes(_png(Image.new("RGB", (30, 20), (90, 90, 90))))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return root, names


def _same_rows(a: ix.StoredIndex, b) -> None:
    assert a.keys == b.keys and a.paths == b.paths and a.skipped == b.skipped
    np.testing.assert_array_equal(a.vectors, b.vectors)


def test_the_index_holds_what_the_scan_computes_and_answers_the_same(tmp_path, capsys):
    pile, names = _pile(tmp_path / "pile")
    r = ix.build_index(str(pile), progress=False, log=lambda t: None)
    assert r["described"] == len(names) + 8 + 2 and r["kept"] == 0
    assert r["statuses"] == {"described": len(names) + 8, "flat": 1, "truncated": 1}
    stored = ix.open_index(str(pile))
    scan = nc.PileIndex(str(pile), progress=False, flips=True)
    _same_rows(stored, scan)
    np.testing.assert_array_equal(stored.flipped, scan.flipped)
    target = photo(11)
    assert stored.copies_of(target) == scan.copies_of(target)
    assert sorted(k for k, *_ in stored.copies_of(target)) == sorted(names)
    # the command answers from the index, with the answer of the scan
    (tmp_path / "photo.png").write_bytes(_png(target))
    argv = ["takedown", "check", str(tmp_path / "photo.png"), "--near", "--pile", str(pile), "--json", "-q"]
    assert main(argv) == 0
    via_index = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*argv, "--no-index"]) == 0
    via_scan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert via_index == via_scan and len(via_index["copies"]) == len(names)
    # takedown add --near: the same keys deny-listed through the index as through the scan
    lists = []
    for extra in ([], ["--no-index"]):
        lst = tmp_path / f"t{len(lists)}.txt"
        assert main(["takedown", "add", str(tmp_path / "photo.png"), "--near", "--list", str(lst), "--pile", str(pile),
                     "-q", *extra]) == 0
        lists.append([line.split("\t")[0] for line in lst.read_text().splitlines() if not line.startswith("#")])
    assert lists[0] == lists[1] and len(lists[0]) == len(names) + 1


def test_takedown_via_the_index_decodes_nothing_and_reads_only_its_copies(tmp_path, monkeypatch):
    pile, names = _pile(tmp_path / "pile", others=12)
    ix.build_index(str(pile), progress=False, log=lambda t: None)
    decoded, read = [], []
    real_decode, real_read = ix.decode_bytes, ix.StoredIndex._read
    monkeypatch.setattr(ix, "decode_bytes", lambda data, name, **kw: decoded.append(name) or real_decode(data, name, **kw))
    monkeypatch.setattr(ix.StoredIndex, "_read", lambda self, r: read.append(self.keys[r]) or real_read(self, r))
    stored = ix.open_index(str(pile))
    found = stored.copies_of(photo(11))
    assert sorted(k for k, *_ in found) == sorted(names)
    assert decoded == [] and sorted(read) == sorted(names)  # verified from the stored targets
    # a copy rewritten since it was described is read again and is no longer taken for a copy
    victim = pile / names[0]
    Image.new("RGB", (64, 48), (200, 10, 10)).save(victim)
    assert sorted(k for k, *_ in stored.copies_of(photo(11))) == sorted(names[1:])


def test_extending_equals_a_full_rebuild_and_redoes_only_what_changed(tmp_path):
    pile, names = _pile(tmp_path / "pile")
    ix.build_index(str(pile), progress=False, log=lambda t: None)
    (pile / "new.png").write_bytes(_png(photo(7)))  # added
    time.sleep(0.01)
    (pile / "x0.png").write_bytes(_png(photo(8).resize((96, 72))))  # changed
    (pile / "x1.png").unlink()  # removed
    with pytest.raises(ix.IndexMismatch) as e:
        ix.open_index(str(pile))
    msg = str(e.value)
    assert "1 changed (x0.png)" in msg and "1 not indexed (new.png)" in msg and "1 gone (x1.png)" in msg
    assert "openseer index" in msg
    r = ix.build_index(str(pile), progress=False, log=lambda t: None)
    assert r["described"] == 2 and r["dropped"] == 2 and r["kept"] == len(names) + 8 + 2 - 2
    extended = ix.open_index(str(pile))
    full = tmp_path / "full"
    ix.build_index(str(pile), index=full, progress=False, log=lambda t: None, workers=2)  # 2 processes: the same
    rebuilt = ix.open_index(str(pile), index=full)
    _same_rows(extended, rebuilt)
    np.testing.assert_array_equal(extended.windows, rebuilt.windows)
    assert extended.content_keys == rebuilt.content_keys
    assert list(extended.pixels) == list(rebuilt.pixels) and list(extended.nbytes) == list(rebuilt.nbytes)


def test_a_shard_replaced_or_added_or_another_descriptor_version_is_named_never_used(tmp_path, monkeypatch, capsys):
    from openseer.data.shards import write_shards

    src, names = _pile(tmp_path / "src")
    shards = tmp_path / "shards"
    write_shards(src, shards, shard_size=5, workers=1)
    assert main(["index", str(shards), "-q"]) == 0
    assert "described now" in capsys.readouterr().out
    stored = ix.open_index(str(shards))
    assert len(stored) == len(names) + 8
    scan = nc.PileIndex(str(shards), progress=False)
    assert stored.keys == scan.keys and stored.paths == scan.paths
    target = photo(11)
    assert stored.copies_of(target) == scan.copies_of(target) and len(stored.copies_of(target)) == len(names)
    tars = sorted(shards.glob("*.tar"))
    # a second run keeps every shard
    assert ix.build_index(str(shards), progress=False, log=lambda t: None)["described"] == 0
    # a shard replaced (other bytes)
    data = tars[1].read_bytes()
    tars[1].write_bytes(data + b"\0" * 1024)
    with pytest.raises(ix.IndexMismatch, match=f"1 changed \\({tars[1].name}\\)"):
        ix.open_index(str(shards))
    r = ix.build_index(str(shards), progress=False, log=lambda t: None)
    assert r["described"] == 5 and r["kept"] == len(names) + 8 + 1 - 5  # the flat image is stored, the broken one not
    # a shard added
    extra = tars[0].with_name("999999.tar")
    extra.write_bytes(tars[0].read_bytes())
    with pytest.raises(ix.IndexMismatch, match="1 not indexed \\(999999.tar\\)"):
        ix.open_index(str(shards))
    extra.unlink()
    # a shard gone
    os.rename(tars[2], tmp_path / "away.tar")
    with pytest.raises(ix.IndexMismatch, match=f"1 gone \\({tars[2].name}\\)"):
        ix.open_index(str(shards))
    os.rename(tmp_path / "away.tar", tars[2])
    assert ix.open_index(str(shards)) is not None
    # another descriptor version: refused by readers, described again by `index`
    monkeypatch.setattr(ix, "DESCRIPTOR_VERSION", "other.v9")
    with pytest.raises(ix.IndexMismatch, match="version"):
        ix.open_index(str(shards))
    (tmp_path / "photo.png").write_bytes(_png(target))
    capsys.readouterr()
    assert main(["takedown", "add", str(tmp_path / "photo.png"), "--near", "--list", str(tmp_path / "t.txt"),
                 "--pile", str(shards), "-q"]) == 2
    err = capsys.readouterr().err
    assert "version" in err and "openseer index" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "t.txt").exists()
    r = ix.build_index(str(shards), progress=False, log=lambda t: None)
    assert r["described"] == len(names) + 8 + 1 and ix.open_index(str(shards)) is not None


def test_the_hostile_collection_through_the_index_build(tmp_path):
    hostile = write_hostile(tmp_path / "pile")
    r = ix.build_index(str(hostile.root), progress=False, log=lambda t: None)
    stored = ix.open_index(str(hostile.root))
    # every good image is described (or flat), every bad one recorded with its reason; the deny-list
    # does not hide an image from the index (check --near reports it as deny-listed)
    assert r["rows"] == hostile.n_files
    described = set(stored.keys)
    flat = stored.skipped.get("flat", 0)
    assert described <= hostile.good | {"a/taken_down.png"} and len(described) + flat == len(hostile.good) + 1
    bad = {k: v for k, v in stored.skipped.items() if k != "flat"}
    assert bad == {k: v for k, v in hostile.skips.items() if k != "denied"}
    assert ix.build_index(str(hostile.root), progress=False, log=lambda t: None)["described"] == 0


def test_approximate_search_finds_what_exact_search_finds():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(400, 64)).astype(np.float32)
    x = np.concatenate([base + rng.normal(scale=0.25, size=base.shape) for _ in range(6)]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.choice(len(x), 300, replace=False)]
    assert choose_kind(1000) == "flat" and choose_kind(500_000) == "hnsw" and choose_kind(5_000_000) == "ivf"
    assert choose_kind(3000, exact_max=1000, hnsw_max=2000) == "ivf"
    for kind in ("hnsw", "ivf"):
        knn = recall_against_exact(x, q, kind, k=6)
        rng_recall = recall_against_exact(x, q, kind, threshold=0.8)
        assert knn >= 0.95 and rng_recall >= 0.95, (kind, knn, rng_recall)
    s = VectorSearch(x, exact_max=1000)
    assert s.kind == "hnsw" and s.describe()["vectors"] == len(x)
    # near-copy candidates through an approximate index: the same copies found
    pile = [*copies(photo(1)).values(), *[photo(s).resize((80, 60)) for s in range(2, 30)]]
    vecs = np.stack([nc.describe(im) for im in pile])
    query = nc.describe_query(photo(1))
    exact = nc.find_copies(query, nc.CopyIndex(vecs), lambda r: pile[r])
    for kind in ("hnsw", "ivf"):
        assert nc.find_copies(query, nc.CopyIndex(vecs, kind=kind), lambda r: pile[r]) == exact


def test_an_interrupted_build_keeps_its_finished_parts_and_resumes(tmp_path, monkeypatch):
    pile, names = _pile(tmp_path / "pile")
    monkeypatch.setattr(ix, "FILES_PER_PART", 4)
    real, calls = ix._describe_bytes, []

    def crash_on_the_tenth(data, where):
        calls.append(where)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real(data, where)

    monkeypatch.setattr(ix, "_describe_bytes", crash_on_the_tenth)
    with pytest.raises(KeyboardInterrupt):
        ix.build_index(str(pile), progress=False, log=lambda t: None)
    monkeypatch.setattr(ix, "_describe_bytes", real)
    doc = json.loads((pile / ix.INDEX_DIR / ix.MANIFEST).read_text())
    assert [p["rows"] for p in doc["parts"]] == [4, 4]  # two whole parts; the third was lost with the crash
    (pile / ix.INDEX_DIR / "parts" / "000009.npy").write_bytes(b"half a part")  # as a crashed rank leaves
    r = ix.build_index(str(pile), progress=False, log=lambda t: None)
    total = len(names) + 8 + 2
    assert r["kept"] == 8 and r["described"] == total - 8 and r["rows"] == total
    resumed = ix.open_index(str(pile))
    ids = {p["id"] for p in json.loads((pile / ix.INDEX_DIR / ix.MANIFEST).read_text())["parts"]}
    assert {p.name.split(".")[0] for p in (pile / ix.INDEX_DIR / "parts").iterdir()} == ids  # nothing left over
    ix.build_index(str(pile), index=tmp_path / "full", progress=False, log=lambda t: None)
    _same_rows(resumed, ix.open_index(str(pile), index=tmp_path / "full"))


def test_hnsw_range_search_answers_many_queries_as_exact_search_does():
    """faiss's HNSW range search aborts the process beyond one internal block of queries; VectorSearch
    asks it in blocks, and on unit vectors far apart it finds exactly what exact search finds."""
    from openseer.data.search import VectorSearch

    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 256)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = np.concatenate([x, x[:100]])  # 700 queries: several blocks
    got, want = VectorSearch(x, kind="hnsw").range(q, 0.9), VectorSearch(x, kind="flat").range(q, 0.9)
    assert len(got[0]) == len(want[0]) == 700
    assert set(zip(got[0].tolist(), got[2].tolist())) == set(zip(want[0].tolist(), want[2].tolist()))


def test_two_torchrun_ranks_write_the_index_one_process_writes(tmp_path):
    """``torchrun --nproc_per_node 2 -m openseer index`` (gloo on CPU): disjoint parts per rank, rank 0's
    manifest; the parts and the manifest are byte for byte those of one process (timestamps aside)."""
    import subprocess
    import sys

    from tests.use.test_ranks import _torchrun

    pile, _ = _pile(tmp_path / "pile", others=5)
    one = tmp_path / "one"
    done = subprocess.run([sys.executable, "-m", "openseer", "index", str(pile), "--index", str(one), "-q",
                           "--files-per-part", "3"],
                          env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    two = tmp_path / "two"
    done = _torchrun("index", str(pile), "--index", str(two), "-q", "--files-per-part", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 ranks" in done.stdout and done.stdout.count("openseer: index") == 1  # rank 0 prints
    a, b = (json.loads((d / ix.MANIFEST).read_text()) for d in (one, two))
    a.pop("updated_utc"), b.pop("updated_utc")
    assert a == b and len(a["parts"]) == 5  # 15 files in parts of 3: ranks 0 and 1 both wrote some
    files = sorted(p.name for p in (one / "parts").iterdir())
    assert files == sorted(p.name for p in (two / "parts").iterdir())
    for name in files:
        assert (one / "parts" / name).read_bytes() == (two / "parts" / name).read_bytes(), name


@pytest.mark.heavy
def test_two_torchrun_ranks_extend_a_shard_index_as_one_process_does(tmp_path):
    """Shards under 2 torchrun ranks: one part per shard, dealt over the ranks; replaced shards'
    parts are replaced in the same order as one process replaces them."""
    import subprocess
    import sys

    from openseer.data.shards import write_shards
    from tests.use.test_ranks import _torchrun

    pile, _ = _pile(tmp_path / "pile", others=5)
    shards = tmp_path / "shards"
    write_shards(pile, shards, shard_size=4, workers=1)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def both() -> None:
        one = subprocess.run([sys.executable, "-m", "openseer", "index", str(shards), "--index",
                              str(tmp_path / "one"), "-q"], env=env, capture_output=True, text=True, timeout=120)
        assert one.returncode == 0, one.stderr
        two = _torchrun("index", str(shards), "--index", str(tmp_path / "two"), "-q")
        assert two.returncode == 0, two.stderr[-3000:]
        a, b = (json.loads((tmp_path / d / ix.MANIFEST).read_text()) for d in ("one", "two"))
        a.pop("updated_utc"), b.pop("updated_utc")
        assert a == b
        names = sorted(p.name for p in (tmp_path / "one" / "parts").iterdir())
        assert names == sorted(p.name for p in (tmp_path / "two" / "parts").iterdir())
        for name in names:
            assert (tmp_path / "one" / "parts" / name).read_bytes() == (tmp_path / "two" / "parts" / name).read_bytes()

    both()
    for tar in sorted(shards.glob("*.tar"))[1::2]:  # two shards touched: described again, on both ranks
        os.utime(tar, ns=(time.time_ns(), time.time_ns()))
    both()
    doc = json.loads((tmp_path / "two" / ix.MANIFEST).read_text())
    assert len(doc["parts"]) == len(list(shards.glob("*.tar"))) and doc["next"] > len(doc["parts"])
