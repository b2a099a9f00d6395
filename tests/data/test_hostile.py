"""Every command that reads a collection, over one hostile collection (tests/data/hostile.py).

None crashes or hangs, each exits 0, each reports the same skip counts by reason, and each good file
is used exactly once: the reader, a file list written by fileio.write_list, shard, data report,
embed, eval's data loading and the eval command, pretrain, takedown add and check, report --data,
curate and distill.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from openseer.commands import main
from openseer.data.collection import SkipCounts, open_collection
from openseer.fileio import name_to_text, write_list
from tests.conftest import FAST
from tests.data.hostile import write_hostile


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    return write_hostile(tmp_path_factory.mktemp("hostile") / "pile")


@pytest.fixture(scope="module")
def run(hostile, tmp_path_factory):
    """One pretraining step over the whole collection (global batch = every listed file)."""
    out = tmp_path_factory.mktemp("hostile") / "run"
    n = hostile.n_files
    assert main(["pretrain", "--data", str(hostile.root), *FAST, f"data.batch_size={n}", "optim.epochs=1",
                 "--out", str(out)]) == 0
    return out


def _reasons(texts) -> Counter:
    return Counter(t.split(":")[0] for t in texts)


def test_the_collection_is_hostile_and_the_reader_counts_it(hostile):
    assert hostile.kinds >= 30
    assert len(hostile.skips) >= 9  # distinct skip reasons
    coll = open_collection(str(hostile.root))
    skips = SkipCounts()
    used = [it.key for it in coll.items(skips=skips) if it.ok]
    assert Counter(skips) == hostile.skips
    assert sorted(used) == sorted(hostile.good) and len(set(used)) == len(used)
    assert skips["denied"] == 1 and skips.read == len(hostile.good)


def test_a_file_list_written_by_the_helper_reads_back_every_name(hostile):
    coll = open_collection(str(hostile.root))
    absolute = hostile.root.parent / "absolute.txt"
    write_list(absolute, [str(e.path) for e in coll.entries])  # every odd byte, newline and quote included
    assert [e.path for e in open_collection(str(absolute)).entries] == [e.path for e in coll.entries]
    listing = hostile.root / "list.txt"  # relative names, beside the collection's takedowns.txt
    write_list(listing, [e.name for e in coll.entries])
    again = open_collection(str(listing))
    assert [e.path for e in again.entries] == [e.path for e in coll.entries]
    skips = SkipCounts()
    good = [it for it in again.items(skips=skips) if it.ok]
    assert Counter(skips) == hostile.skips and len(good) == len(hostile.good)


def test_shard_and_data_report(hostile, tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["shard", str(hostile.root), "--out", str(out), "-q", "--workers", "1"]) == 0
    index = json.loads((out / "index.json").read_text())
    counts = {k[len("skipped_"):]: v for k, v in index["counts"].items() if k.startswith("skipped_")}
    assert counts == dict(hostile.skips)
    with open(out / "manifest.csv", newline="", encoding="utf-8") as f:
        sources = [r["source"] for r in csv.DictReader(f)]
    assert sorted(sources) == sorted(hostile.good)
    capsys.readouterr()
    assert main(["data", "report", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["skipped"] == dict(hostile.skips) and r["images"] == len(hostile.good) and r["duplicates"] == 0


def test_pretrain_reads_every_file_and_counts_the_bad_ones(hostile, run):
    lines = (run / "bad_images.txt").read_text(encoding="utf-8").splitlines()
    by_key = dict(line.split("\t", 1)[::-1] for line in lines)  # a bad file may be met twice (replaced)
    assert Counter(by_key.values()) == hostile.skips
    assert not set(by_key) & hostile.good


def test_embed(hostile, run, tmp_path):
    out = tmp_path / "emb"
    assert main(["embed", str(run), "--data", str(hostile.root), "--out", str(out), "--quiet",
                 "--batch-size", "16"]) == 0
    with open(out / "index.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["key"] for r in rows) == sorted(hostile.good)
    with open(out / "bad.csv", newline="", encoding="utf-8") as f:
        assert _reasons(r["reason"] for r in csv.DictReader(f)) == hostile.skips
    import numpy as np

    assert np.load(out / "embeddings.npy").shape[0] == len(hostile.good)


def test_eval_data_loading_and_the_eval_command(hostile, run, tmp_path):
    from openseer.eval.common import EvalTransform, load_batch, open_labelled

    data = open_labelled(str(hostile.root), seed=0)
    bad: list = []
    keys = []
    for split in (data.train, data.test):
        got: list = []
        load_batch(split, list(range(len(split))), EvalTransform(24, (0, 0, 0), (1, 1, 1)), bad=got)
        bad += [reason for _, reason in got]
        bad_idx = {i for i, _ in got}
        keys += [k for i, k in enumerate(split.keys) if i not in bad_idx]
    assert _reasons(bad) == hostile.skips
    assert sorted(keys) == sorted(hostile.good)
    assert main(["eval", str(run), "--data", str(hostile.root), "--protocols", "knn", "--no-cache",
                 "--skip-missing", "--out", str(tmp_path / "eval.json")]) == 0


def test_takedown_add_and_check(hostile, run, tmp_path, capsys):
    deny = tmp_path / "takedowns.txt"
    assert main(["takedown", "add", "--image", str(hostile.root), "--list", str(deny)]) == 0
    err = capsys.readouterr().err
    # listing what to deny ignores the deny-list already there: the taken-down image is read too
    others = SkipCounts()
    others.update({r: n for r, n in hostile.skips.items() if r != "denied"})
    others.read = len(hostile.good) + 1
    assert others.summary() in err
    keys = [line.split("\t")[0] for line in deny.read_text().splitlines() if line and not line.startswith("#")]
    assert len(keys) == len(hostile.good) + 1
    good_file = hostile.root / "a" / "static.gif" if (hostile.root / "a" / "static.gif").exists() else \
        hostile.root / "b" / "static.gif"
    assert main(["takedown", "check", str(good_file), "--runs", str(run)]) in (0, 1)
    assert "READ" in capsys.readouterr().out  # the folder run read it


def test_report_data(hostile, run, tmp_path):
    from openseer.use.run_report import load_sample

    sample = load_sample(str(hostile.root), 10_000, 24, 0)
    assert sample.skipped == dict(sorted(hostile.skips.items()))
    assert sorted(sample.keys) == sorted(hostile.good)
    assert main(["report", str(run), "--data", str(hostile.root), "--sample", "16",
                 "--out", str(tmp_path / "r.html")]) == 0


def test_curate(hostile, tmp_path):
    out = tmp_path / "cur"
    # keep everything that is not a duplicate: every good file gets exactly one decision, every bad one its reason
    assert main(["curate", str(hostile.root), "--out", str(out), "--model", "test_resnet", "--keep", "1",
                 "--clusters", "2", "--quiet", "--threads", "1"]) == 0
    s = json.loads((out / "curate.json").read_text())
    assert s["bad_by_reason"] == dict(hostile.skips) and s["decoded"] == len(hostile.good)
    with open(out / "decisions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    decided = [r["key"] for r in rows if not r["decision"].startswith("bad:")]
    assert sorted(decided) == sorted(hostile.good)
    kept = open_collection(str(out / "list.txt")).entries  # the kept list opens every name again
    assert len(kept) == s["kept"] and all(e.path.is_file() for e in kept)


def test_distill(hostile, run, tmp_path):
    out = tmp_path / "student"
    n = hostile.n_files
    assert main(["distill", str(run), "--student", "test_resnet", "--data", str(hostile.root), *FAST,
                 f"data.batch_size={n}", "optim.epochs=1", "--out", str(out)]) == 0
    lines = (out / "bad_images.txt").read_text(encoding="utf-8").splitlines()
    by_key = dict(line.split("\t", 1)[::-1] for line in lines)
    assert Counter(by_key.values()) == hostile.skips
    assert not set(by_key) & hostile.good


def test_nothing_usable_is_one_clear_error(tmp_path, capsys):
    pile = tmp_path / "bad"
    pile.mkdir()
    (pile / "a.jpg").write_bytes(b"")
    (pile / "b.png").write_text("not a png")
    assert main(["shard", str(pile), "--out", str(tmp_path / "s"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "no usable image" in err and "empty 1" in err and "not_an_image 1" in err
    assert "Traceback" not in err
    assert name_to_text(Path("x")) == "x"
