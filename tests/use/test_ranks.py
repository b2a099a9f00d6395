"""The rank-chunked runner under real torchrun (2 gloo processes on CPU): ``embed`` and ``predict`` on 2
ranks write the same files as 1 process (bad files included); a job stopped early, or a rank that
crashed, is finished by a 2-rank rerun that redoes only the chunks not done."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import openseer
from openseer.commands import main
from openseer.train.distributed import DistEnv
from openseer.use.embed import embed_collection, load_embeddings
from openseer.use.ranks import Ranks, open_ranks
from tests.use.kit import image_folder, make_run

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str, script: str = "") -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m openseer ARGS`` (or a script), one thread per rank."""
    target = [script] if script else ["-m", "openseer"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), *target, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("ranks") / "run")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """15 images and 2 bad files: 5 chunks of 4 rows, so both ranks get chunks and bad rows."""
    root = image_folder(tmp_path_factory.mktemp("ranks") / "imgs")
    (root / "broken.jpg").write_bytes(b"<html>not an image</html>")
    (root / "sub" / "empty.png").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def one_process(run, folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks") / "one"
    meta = embed_collection(openseer.load(run), str(folder), out, dtype="float32", chunk_size=4, progress=False)
    assert meta["complete"] and meta["ranks"] == 1
    return out


def _same_job(a: Path, b: Path) -> None:
    """The same rows in the same order, the same bad files, values within float noise."""
    xa, ia = load_embeddings(a)
    xb, ib = load_embeddings(b)
    assert ia == ib and len(ia) == 15
    np.testing.assert_allclose(np.asarray(xa), np.asarray(xb), rtol=1e-5, atol=1e-6)
    assert (a / "bad.csv").read_text() == (b / "bad.csv").read_text()


def test_chunks_are_dealt_round_robin_and_one_process_needs_no_group():
    two = [Ranks(DistEnv(r, 2)) for r in range(2)]
    assert [r.mine(list(range(5))) for r in two] == [[0, 2, 4], [1, 3]]
    alone = open_ranks("cpu")
    assert (alone.world, alone.group, alone.mine([1, 2])) == (1, None, [1, 2])
    assert alone.on_main(lambda x: x + 1, 1) == 2 and alone.gather("x") == ["x"]


@pytest.mark.slow
@pytest.mark.heavy  # a torchrun launch; make test covers the same through the resumed job and predict
def test_two_rank_embed_equals_one_process(run, folder, one_process, tmp_path):
    out = tmp_path / "two"
    r = _torchrun("embed", str(run), "--data", str(folder), "--out", str(out), "--chunk-size", "4",
                  "--dtype", "float32", "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("openseer: 15 embeddings") == 1 and "on 2 ranks" in r.stdout  # rank 0 prints
    _same_job(out, one_process)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["ranks"] == 2 and meta["images_this_run"] == 17 and meta["n_bad"] == 2
    assert not (out / "parts").exists() and not (out / "embeddings.partial.npy").exists()


@pytest.mark.slow
def test_a_job_stopped_early_is_finished_by_two_ranks(run, folder, one_process, tmp_path):
    out = tmp_path / "emb"
    first = embed_collection(openseer.load(run), str(folder), out, dtype="float32", chunk_size=4, progress=False,
                             max_chunks=2)
    assert not first["complete"] and sorted(p.name for p in (out / "parts").glob("*[0-9].csv")) == [
        "000000.csv", "000001.csv"]
    r = _torchrun("embed", str(run), "--data", str(folder), "--out", str(out), "--chunk-size", "4",
                  "--dtype", "float32", "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "(2 chunks were already done) on 2 ranks" in r.stdout
    meta = json.loads((out / "meta.json").read_text())
    assert meta["chunks_skipped"] == 2 and meta["images_this_run"] == 9  # only the 3 chunks left were redone
    _same_job(out, one_process)


CRASH = """
import os, sys
import openseer.use.embed as embed
from openseer.commands import main

real, calls = embed._embed_chunk, []

def crash_on_second_chunk(*args, **kwargs):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:
        os._exit(17)  # rank 1 dies after its first chunk was written: torchrun stops rank 0 too
    return real(*args, **kwargs)

embed._embed_chunk = crash_on_second_chunk
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.heavy  # two torchrun launches: ~20 s on 2 busy cores
def test_a_crashed_rank_loses_nothing_and_the_rerun_redoes_its_chunks(run, folder, one_process, tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    out = tmp_path / "emb"
    args = ["embed", str(run), "--data", str(folder), "--out", str(out), "--chunk-size", "4", "--dtype", "float32",
            "--quiet"]
    r = _torchrun(*args, script=str(script))
    assert r.returncode != 0 and not (out / "embeddings.npy").exists()
    assert (out / "parts" / "000001.csv").is_file()  # rank 1's first chunk, written before it died
    done = {int(p.name[:6]) for p in (out / "parts").glob("*[0-9].csv")}
    assert 3 not in done  # rank 1's second chunk was lost with it
    r = _torchrun(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    meta = json.loads((out / "meta.json").read_text())
    sizes = {0: 4, 1: 4, 2: 4, 3: 4, 4: 1}
    assert meta["chunks_skipped"] == len(done) and meta["images_this_run"] == 17 - sum(sizes[c] for c in done)
    _same_job(out, one_process)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    import timm

    from openseer.use.classifier import LinearProbs, save_classifier

    backbone = timm.create_model("test_resnet", num_classes=0, pretrained=False).eval()
    info = {"arch": "test_resnet", "crop_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3,
            "feature_dim": backbone.num_features}
    torch.manual_seed(0)
    head = LinearProbs(torch.randn(4, backbone.num_features), torch.randn(4))
    folder = tmp_path_factory.mktemp("ranks") / "clf"
    save_classifier(folder, backbone, info, head, ["a", "b", "c", "d"], "last", "linear(l2=0.01)")
    return folder


@pytest.mark.slow
def test_two_rank_predict_writes_the_same_csv_as_one(classifier, folder, tmp_path, capsys):
    args = ["--data", str(folder), "--chunk-size", "4", "--top", "3", "--quiet", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        assert main(["predict", str(classifier), "--out", str(tmp_path / "one.csv"), *args]) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    r = _torchrun("predict", str(classifier), "--out", str(tmp_path / "two.csv"), *args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("15 images predicted") == 1  # rank 0 prints, rank 0 writes
    one, two = (tmp_path / "one.csv").read_text(), (tmp_path / "two.csv").read_text()
    assert one == two and len(one.splitlines()) == 16
    assert (tmp_path / "one.bad.csv").read_text() == (tmp_path / "two.bad.csv").read_text()
    assert len((tmp_path / "two.bad.csv").read_text().splitlines()) == 3
    assert not (tmp_path / "two.csv.parts").exists()


def test_an_interrupted_predict_continues_from_its_chunks(classifier, folder, tmp_path, monkeypatch, capsys):
    import openseer.use.embed as embed

    args = ["--data", str(folder), "--chunk-size", "4", "--top", "2", "--quiet"]
    assert main(["predict", str(classifier), "--out", str(tmp_path / "whole.csv"), *args]) == 0
    real, calls, stop = embed._embed_chunk, [], [3]

    def interrupted_on_the_third_chunk(*a, **k):
        calls.append(1)
        if len(calls) == stop[0]:
            raise KeyboardInterrupt  # Ctrl-C in the middle of a chunk
        return real(*a, **k)

    monkeypatch.setattr(embed, "_embed_chunk", interrupted_on_the_third_chunk)
    out = tmp_path / "preds.csv"
    assert main(["predict", str(classifier), "--out", str(out), *args]) == 130
    assert not out.exists() and len(list((tmp_path / "preds.csv.parts" / "parts").glob("*[0-9].csv"))) == 2
    calls.clear()
    stop[0] = 0
    assert main(["predict", str(classifier), "--out", str(out), *args]) == 0
    assert len(calls) == 3  # only the 3 chunks not done were embedded
    assert out.read_text() == (tmp_path / "whole.csv").read_text()
    assert (tmp_path / "preds.bad.csv").read_text() == (tmp_path / "whole.bad.csv").read_text()
    assert not (tmp_path / "preds.csv.parts").exists()


@pytest.mark.heavy  # a torchrun launch and a curate of the same pile in one process
def test_two_rank_curate_keeps_what_one_process_keeps(run, folder, tmp_path, capsys):
    """curate's embedding pass split over 2 gloo ranks: rank 0 alone decides and prints, the kept list
    and the decisions equal one process's."""
    from openseer.commands import main

    assert main(["curate", str(folder), "--model", str(run), "--out", str(tmp_path / "one"), "--keep", "0.5",
                 "--dup-by", "embedding", "--quiet"]) == 0
    capsys.readouterr()
    r = _torchrun("curate", str(folder), "--model", str(run), "--out", str(tmp_path / "two"), "--keep", "0.5",
                  "--dup-by", "embedding")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("openseer: kept") == 1  # rank 0 alone speaks
    assert (tmp_path / "two" / "list.txt").read_text() == (tmp_path / "one" / "list.txt").read_text()
    _same_job(tmp_path / "one" / "embed", tmp_path / "two" / "embed")
