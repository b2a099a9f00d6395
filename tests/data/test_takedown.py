"""Takedowns: a versioned deny-list honoured at read time (also on resume), run provenance,
``takedown check`` finding the runs and checkpoints that saw an image, bit-exact resume on shards."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from openseer.commands import main
from openseer.data.batches import iterate_batches
from openseer.data.collection import open_collection
from openseer.data.shards import write_shards
from openseer.data.takedown import DenyList, add_to_denylist, content_key, list_version, read_entries
from openseer.train.checkpoint import list_checkpoints, load_checkpoint
from openseer.train.loop import pretrain
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def pile(tmp_path_factory) -> tuple[Path, Path, dict[str, Path]]:
    """24 photos-ish PNGs -> 4 shards of 6; returns (root, shards, key -> original file)."""
    root = tmp_path_factory.mktemp("takedown")
    (root / "in").mkdir()
    rng = np.random.default_rng(3)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / "in" / f"p{i:02d}.png")
    write_shards(root / "in", root / "shards", shard_size=6, workers=1)
    with open(root / "shards" / "manifest.csv", newline="") as f:
        files = {r["key"]: root / "in" / r["source"] for r in csv.DictReader(f)}
    return root, root / "shards", files


RUN = ["data.batch_size=4", "data.num_workers=0", "optim.epochs=1", "checkpoint.every=2", "checkpoint.keep=10",
       "log.every=1", "data.shuffle_buffer=5"]


def _order(shards: Path, *extra: str) -> list[list[str]]:
    cfg = tiny_config(*RUN, *extra)
    return [b.keys for b in iterate_batches(open_collection(str(shards), data_cfg=cfg.data), cfg, 0, 1, 0, 6)]


def test_denylist_normalises_versions_and_appends(tmp_path):
    data = b"some image bytes"
    full = hashlib.sha256(data).hexdigest()
    src = tmp_path / "hashes.txt"
    src.write_text(f"# takedown ticket 17\n{full.upper()}\n\n{full[:32]}, duplicate\nmanifest-key-7 extra columns\n")
    assert read_entries(src) == [full[:32], full[:32], "manifest-key-7"]
    lst = tmp_path / "deny" / "takedowns.txt"
    added, deny = add_to_denylist(lst, read_entries(src), note="ticket\t17")
    assert added == 2 and deny.keys == [full[:32], "manifest-key-7"]
    v1 = deny.version
    assert v1 == list_version(deny.keys) and v1 != "empty"
    assert add_to_denylist(lst, [full])[0] == 0  # already there: nothing changes
    assert DenyList.load(lst).version == v1
    added, deny = add_to_denylist(lst, ["k2"])
    assert added == 1 and deny.version != v1 and deny.keys[:2] == [full[:32], "manifest-key-7"]
    assert deny.denies("whatever", data) and deny.denies("k2") and not deny.denies("k3", b"other")
    assert DenyList.load(tmp_path / "missing.txt").version == "empty"


def test_denylisted_images_never_appear_in_a_batch(pile, tmp_path):
    root, shards, files = pile
    order = [k for keys in _order(shards) for k in keys]
    victims = order[:2] + order[10:12]
    hashes = tmp_path / "hashes.txt"
    hashes.write_text("\n".join(hashlib.sha256(files[k].read_bytes()).hexdigest() for k in victims[:3]) + "\n")
    deny = tmp_path / "takedowns.txt"
    assert main(["takedown", "add", str(hashes), "--image", str(files[victims[3]]), "--list", str(deny)]) == 0
    cfg = tiny_config(*RUN, f"data.denylist={deny}", "data.num_workers=2")
    src = open_collection(str(shards), data_cfg=cfg.data)
    seen, denied = [], []
    for batch in iterate_batches(src, cfg, 0, 1, 0, 15):  # three virtual epochs' worth
        seen += batch.keys
        denied += [k for k, r in batch.bad if r == "denied"]
    assert not set(victims) & set(seen)
    assert set(seen) == set(files) - set(victims)
    assert {k.split(":")[1] for k in denied} == set(victims)


def test_shard_runs_resume_bit_exact_and_takedown_check_finds_who_saw_an_image(pile, tmp_path, capsys):
    root, shards, files = pile
    runs = tmp_path / "runs"
    cfg = tiny_config(*RUN, f"data.source={shards}")
    pretrain(cfg, runs / "straight")
    pretrain(cfg, runs / "split", max_steps=3)
    pretrain(tiny_config(*RUN, f"data.source={shards}"), runs / "split", resume=True)
    a, b = (load_checkpoint(list_checkpoints(runs / r)[-1]) for r in ("straight", "split"))
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["data"] == b["data"]
    prov = json.loads((runs / "split" / "data_provenance.json").read_text())
    assert [s["start_step"] for s in prov["sessions"]] == [0, 3]
    assert len(prov["shards"]) == 4 and prov["manifest"]["sha256"]

    order = _order(shards)
    at = {k: step for step, keys in enumerate(order) for k in keys}
    early = next(k for k, s in at.items() if s == 0)
    middle = next(k for k, s in at.items() if s == 3)
    late = next(k for k, s in at.items() if s == 5)
    capsys.readouterr()
    assert main(["takedown", "check", str(files[early]), "--runs", str(runs), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["key"] == early == content_key(files[early].read_bytes())
    for run in out["runs"]:
        assert run["read"] and run["checkpoints"] and all(run["checkpoints"].values())
    main(["takedown", "check", str(files[middle]), "--runs", str(runs), "--json"])
    for run in json.loads(capsys.readouterr().out)["runs"]:
        assert run["checkpoints"]["step_00000002.pt"] is False and run["checkpoints"]["step_00000004.pt"] is True
    main(["takedown", "check", late, "--runs", str(runs), "--json"])
    for run in json.loads(capsys.readouterr().out)["runs"]:
        assert [run["checkpoints"][f"step_0000000{s}.pt"] for s in (2, 4, 6)] == [False, False, True]
    pretrain(cfg, runs / "short", max_steps=1)
    capsys.readouterr()
    assert main(["takedown", "check", late, "--runs", str(runs / "short")]) == 0
    assert "checkpoints that saw it: none" in capsys.readouterr().out
    assert main(["takedown", "check", "0" * 32, "--runs", str(runs)]) == 0
    assert "not read" in capsys.readouterr().out
    # a shard whose size differs from the one the run recorded: the answer says it cannot tell for sure
    short = runs / "short" / "data_provenance.json"
    rec = json.loads(short.read_text())
    assert rec["shard_bytes"] == [Path(u).stat().st_size for u in rec["shards"]]
    rec["shard_bytes"][1] += 512  # as if shard 1 had been rewritten since the run read it
    short.write_text(json.dumps(rec))
    main(["takedown", "check", late, "--runs", str(runs / "short"), "--json"])
    (run,) = json.loads(capsys.readouterr().out)["runs"]
    assert run["unsure"] and "changed size since the run" in run["note"] and Path(rec["shards"][1]).name in run["note"]


def test_a_takedown_between_runs_applies_on_resume(pile, tmp_path, capsys):
    root, shards, files = pile
    run = tmp_path / "run"
    deny = tmp_path / "takedowns.txt"
    first = _order(shards)[0][0]
    add_to_denylist(deny, [first])  # on the list before the run starts
    cfg = tiny_config(*RUN, f"data.source={shards}", f"data.denylist={deny}")
    pretrain(cfg, run, max_steps=3)
    later = [k for keys in _order(shards, f"data.denylist={deny}")[4:] for k in keys]
    add_to_denylist(deny, later[:2])
    pretrain(tiny_config(*RUN, f"data.source={shards}", f"data.denylist={deny}"), run, resume=True)
    capsys.readouterr()
    lines = (run / "bad_images.txt").read_text().splitlines()
    # dropped after the resume (again in the next pass, which the 2 missing samples make the run enter)
    assert {line.split("\t")[1].split(":")[1] for line in lines if line.startswith("denied")} == {first, *later[:2]}
    prov = json.loads((run / "data_provenance.json").read_text())
    assert [s["denylist"]["entries"] for s in prov["sessions"]] == [1, 3]
    main(["takedown", "check", later[0], "--runs", str(run), "--json"])
    assert "conservative" in json.loads(capsys.readouterr().out)["runs"][0]["note"]
    assert main(["takedown", "check", first, "--runs", str(run), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)["runs"][0]
    assert answer["read"] and not any(answer["checkpoints"].values()) and "never delivered" in answer["note"]


def test_folder_runs_honour_the_denylist_and_takedown_check_replays_their_order(tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(5)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (28, 36, 3), dtype=np.uint8)).save(
            folder / ("sub" if i % 3 == 0 else ".") / f"f{i:02d}.png")
    (folder / "f99.png").write_bytes(b"not an image")  # unreadable: a neighbour stands in for it
    run_args = ["data.batch_size=4", "data.num_workers=0", "optim.epochs=2", "checkpoint.every=2",
                "checkpoint.keep=10", "log.every=1"]
    # deny two files: one by content key (--image), one by its relative path (a manifest-style key)
    deny = tmp_path / "takedowns.txt"
    victim_a = folder / "f01.png"
    (tmp_path / "keys.txt").write_text("sub/f03.png\n")  # sub/f03.png by its relative path
    assert main(["takedown", "add", str(tmp_path / "keys.txt"), "--image", str(victim_a), "--list", str(deny)]) == 0
    cfg = tiny_config(*run_args, f"data.denylist={deny}")
    src = open_collection(str(folder), data_cfg=cfg.data)
    assert "deny-list" in src.description
    seen, denied = [], []
    for batch in iterate_batches(src, cfg, 0, 1, 0, 9):  # three epochs of 3 steps
        seen += batch.keys
        denied += [k for k, r in batch.bad if r == "denied"]
    assert "f01.png" not in seen and "sub/f03.png" not in seen
    assert {"f01.png", "sub/f03.png"} <= set(denied)

    # a folder run without a deny-list: provenance recorded, and `takedown check` replays the order
    runs = tmp_path / "runs"
    cfg = tiny_config(*run_args, f"data.source={folder}")
    pretrain(cfg, runs / "r")
    prov = json.loads((runs / "r" / "data_provenance.json").read_text())
    assert prov["folder"]["files"] == 13 and prov["source"] == str(folder)
    order = [b.keys for b in iterate_batches(open_collection(str(folder), data_cfg=cfg.data), cfg, 0, 1, 0, 6)]
    first = {}
    for step, keys in enumerate(order):
        for k in keys:
            first.setdefault(k, step)
    ckpts = sorted(p.name for p in list_checkpoints(runs / "r"))
    for name, step in first.items():
        capsys.readouterr()
        main(["takedown", "check", str(folder / name), "--runs", str(runs), "--json"])
        (run,) = json.loads(capsys.readouterr().out)["runs"]
        assert run["read"], name
        expected = {c: step < int(c.split("_")[1].split(".")[0]) for c in ckpts}
        assert run["checkpoints"] == expected, name
    never = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png")
                   if p.relative_to(folder).as_posix() not in first and p.name != "f99.png")
    for name in never:  # left out by the dropped last partial batch of each epoch
        main(["takedown", "check", str(folder / name), "--runs", str(runs), "--json"])
        (run,) = json.loads(capsys.readouterr().out)["runs"]
        assert not any(run["checkpoints"].values()), name

    # the run recorded the listing it read: a file added since is not reported as read by it
    listing = prov["folder"]["listing"]
    assert listing["count"] == 13 and listing["file"] == "data_listing.txt.gz"
    assert (runs / "r" / "data_listing.txt.gz").is_file()
    (folder / "a00.png").write_bytes(_png(rng))  # sorts first: today's listing shifts every position
    assert main(["takedown", "check", str(folder / "a00.png"), "--runs", str(runs), "--json"]) == 0
    (run,) = json.loads(capsys.readouterr().out)["runs"]
    assert not run["read"] and not run["unsure"] and not any(run["checkpoints"].values())
    assert "not among the 13 files the run listed in" in run["note"] and "changed since the run" in run["note"]
    for name, step in list(first.items())[:3]:  # files the run read: still reported, from the record
        main(["takedown", "check", str(folder / name), "--runs", str(runs), "--json"])
        (run,) = json.loads(capsys.readouterr().out)["runs"]
        assert run["read"] and not run["unsure"], name
        assert run["checkpoints"] == {c: step < int(c.split("_")[1].split(".")[0]) for c in ckpts}, name

    # only a digest (a huge listing, or its file gone): today's listing differs, so it cannot tell
    gz = (runs / "r" / "data_listing.txt.gz").read_bytes()
    (runs / "r" / "data_listing.txt.gz").unlink()
    main(["takedown", "check", str(folder / "a00.png"), "--runs", str(runs), "--json"])
    (run,) = json.loads(capsys.readouterr().out)["runs"]
    assert run["unsure"] and not run["read"] and "kept only a digest" in run["note"]
    (runs / "r" / "data_listing.txt.gz").write_bytes(gz)

    # a resume on another listing keeps the first start's record and marks the change
    from openseer.data.takedown import folder_provenance

    again = folder_provenance(runs / "r", open_collection(str(folder), data_cfg=cfg.data))["folder"]["listing"]
    assert again["sha256"] == listing["sha256"] and again["count"] == 13 and again["changed_on_resume"]
    assert (runs / "r" / "data_listing.txt.gz").read_bytes() == gz

    # an older run without the record: the honest "cannot tell" (exit 1: it may have read it)
    prov["folder"].pop("listing")
    (runs / "r" / "data_provenance.json").write_text(json.dumps(prov))
    assert main(["takedown", "check", str(folder / "a00.png"), "--runs", str(runs)]) == 1
    out = capsys.readouterr().out
    assert "CANNOT TELL" in out and "recorded no listing" in out and "13 files, 14 now" in out


def _png(rng) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (28, 36, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
