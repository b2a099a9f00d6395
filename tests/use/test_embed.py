"""openseer embed: folders, file lists and shards -> .npy + index.csv; bad images listed; resumable."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import openseer
from openseer.commands import main
from openseer.use.embed import EmbedError, embed_collection, load_embeddings
from tests.use.kit import image_folder, make_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("embed") / "run")


@pytest.fixture(scope="module")
def model(run):
    return openseer.load(run)


@pytest.fixture
def folder(tmp_path):
    root = image_folder(tmp_path / "imgs")
    (root / "broken.jpg").write_bytes(b"<html>not an image</html>")
    (root / "sub" / "empty.png").write_bytes(b"")
    return root


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_folder_embeddings_have_the_right_shape_keys_and_values(run, model, folder, tmp_path, capsys):
    out = tmp_path / "emb"
    assert main(["embed", str(run), "--data", str(folder), "--out", str(out), "--quiet", "--chunk-size", "4"]) == 0
    assert "15 embeddings of 368 float16" in capsys.readouterr().out
    arr, index = load_embeddings(out)
    assert arr.shape == (15, model.feature_dim) and arr.dtype == np.float16
    assert isinstance(arr, np.memmap)
    keys = [r["key"] for r in index]
    assert keys[:2] == ["img000.png", "img001.png"] and keys[-1] == "sub/big002.png"
    assert [int(r["row"]) for r in index] == list(range(15))
    bad = {r["key"]: r["reason"] for r in _rows(out / "bad.csv")}
    assert bad == {"broken.jpg": "not_an_image", "sub/empty.png": "empty"}
    # the same numbers as the Python API on the same files
    ref = model.embed([r["path"] for r in index])
    np.testing.assert_allclose(arr.astype(np.float32), ref, rtol=2e-3, atol=2e-3)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["n"] == 15 and meta["n_bad"] == 2 and meta["model"]["arch"] == "regnety_002"
    assert not (out / "parts").exists() and not (out / "embeddings.partial.npy").exists()


def test_interrupted_job_resumes_skipping_finished_chunks(model, folder, tmp_path):
    whole = embed_collection(model, str(folder), tmp_path / "whole", dtype="float32", chunk_size=4, progress=False)
    out = tmp_path / "emb"
    first = embed_collection(model, str(folder), out, dtype="float32", chunk_size=4, progress=False, max_chunks=2)
    assert not first["complete"] and first["images_this_run"] == 8
    assert (out / "embeddings.partial.npy").is_file() and len(list((out / "parts").glob("*.bad.csv"))) == 2
    done = embed_collection(model, str(folder), out, dtype="float32", chunk_size=4, progress=False)
    assert done["complete"] and done["chunks_skipped"] == 2 and done["images_this_run"] == 9
    a, ia = load_embeddings(out)
    b, ib = load_embeddings(tmp_path / "whole")
    assert ia == ib and np.array_equal(np.asarray(a), np.asarray(b)) and whole["n"] == done["n"]
    # the same command again does nothing; other settings are refused unless --overwrite
    assert embed_collection(model, str(folder), out, dtype="float32", chunk_size=4,
                            progress=False)["resumed"] == "already complete"
    with pytest.raises(EmbedError, match="dtype"):
        embed_collection(model, str(folder), out, dtype="float16", progress=False)
    again = embed_collection(model, str(folder), out, dtype="float16", progress=False, overwrite=True)
    assert again["complete"] and again["dtype"] == "float16"


def test_file_list_and_shards(run, model, folder, tmp_path):
    from openseer.data.shards import write_shards

    listing = tmp_path / "list.txt"
    listing.write_text("# two files and a missing one\nimgs/img003.png\nimgs/sub/big001.png\nimgs/gone.png\n")
    meta = embed_collection(model, str(listing), tmp_path / "e1", progress=False)
    arr, index = load_embeddings(tmp_path / "e1")
    assert arr.shape == (2, 368) and [r["key"] for r in index] == ["imgs/img003.png", "imgs/sub/big001.png"]
    assert _rows(tmp_path / "e1" / "bad.csv")[0]["reason"].startswith("unreadable") and meta["n_bad"] == 1

    write_shards(folder, tmp_path / "shards", shard_size=6, workers=0)  # bad files are left out here
    assert main(["embed", str(run), "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "e2"),
                 "--quiet", "--dtype", "float32"]) == 0
    arr, index = load_embeddings(tmp_path / "e2")
    assert arr.shape == (15, 368) and all(r["path"].split("#")[0].endswith(".tar") for r in index)
    # the shards hold the files' bytes: each shard embedding is one of the files' embeddings
    files = sorted(p for p in folder.rglob("*.png") if p.stat().st_size)
    ref = model.embed(files)
    dist = np.abs(np.asarray(arr)[:, None, :] - ref[None, :, :]).max(axis=2)
    assert dist.min(axis=1).max() < 1e-4 and len(set(dist.argmin(axis=1))) == 15


def test_not_an_embedding_folder_is_left_alone(model, folder, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(EmbedError, match="not an openseer embedding folder"):
        embed_collection(model, str(folder), out, progress=False)
    with pytest.raises(EmbedError, match="refusing to delete"):
        embed_collection(model, str(folder), out, progress=False, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"


def test_layer_embeds_the_named_stages_and_is_part_of_the_job(run, model, folder, tmp_path, capsys):
    out = tmp_path / "emb"
    assert main(["embed", str(run), "--data", str(folder), "--out", str(out), "--quiet", "--dtype", "float32",
                 "--layer", "s3+s4"]) == 0
    arr, index = load_embeddings(out)
    widths = {f["module"]: f["num_chs"] for f in model.backbone.feature_info}
    assert arr.shape == (15, widths["s3"] + widths["s4"])
    # each stage's pooled vector is L2-normalised before they are joined
    np.testing.assert_allclose(np.linalg.norm(arr[:, :widths["s3"]], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(arr, axis=1), 2 ** 0.5, rtol=1e-5)
    ref = openseer.load(run, layer="s3+s4").embed([r["path"] for r in index])
    np.testing.assert_allclose(arr, ref, rtol=1e-4, atol=1e-5)
    # the s4 half is the normalised last-stage embedding
    last = model.embed([r["path"] for r in index], normalize=True)
    np.testing.assert_allclose(arr[:, widths["s3"]:], last, rtol=1e-4, atol=1e-5)
    assert "s3+s4" in json.loads((out / "meta.json").read_text())["feature_layer"]
    # the same folder cannot silently mix layers
    with pytest.raises(EmbedError, match="layer"):
        embed_collection(model, str(folder), out, dtype="float32", progress=False)
    capsys.readouterr()
    assert main(["embed", str(run), "--data", str(folder), "--out", str(tmp_path / "x"), "--layer", "res5"]) == 2
    err = capsys.readouterr().err
    assert "unknown stage 'res5'" in err and "s1, s2, s3, s4" in err


def test_max_chunks_stops_early_with_exit_1_and_the_same_command_finishes(run, folder, tmp_path, capsys):
    out = tmp_path / "emb"
    args = ["embed", str(run), "--data", str(folder), "--out", str(out), "--quiet", "--chunk-size", "8"]
    assert main([*args, "--max-chunks", "1"]) == 1
    assert "stopped early" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["000000.bad.csv", "000000.csv"]
    assert main(args) == 0
    assert "(1 chunks were already done)" in capsys.readouterr().out
    assert json.loads((out / "meta.json").read_text())["images_this_run"] == 9


def test_chunks_marked_done_are_redone_when_the_partial_array_is_gone(model, folder, tmp_path):
    whole = tmp_path / "whole"
    embed_collection(model, str(folder), whole, dtype="float32", chunk_size=4, progress=False)
    out = tmp_path / "emb"
    embed_collection(model, str(folder), out, dtype="float32", chunk_size=4, progress=False, max_chunks=2)
    (out / "embeddings.partial.npy").unlink()  # the rows of the 2 finished chunks went with it
    done = embed_collection(model, str(folder), out, dtype="float32", chunk_size=4, progress=False)
    assert done["complete"] and done["chunks_skipped"] == 0 and done["images_this_run"] == 17
    np.testing.assert_array_equal(np.asarray(load_embeddings(out)[0]), np.asarray(load_embeddings(whole)[0]))
