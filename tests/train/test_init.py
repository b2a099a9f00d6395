"""``openseer pretrain --init``: a new run that starts from existing weights, end to end.

From an openseer run (backbone, head and prototypes: the first step's Sinkhorn codes use the loaded
prototypes), from an exported backbone (prototypes from seeded k-means of the pile's projected
features, reproducibly), what the run records (config.yaml, init.json), resuming such a run, and the
command line's refusals. Tiny models on a Fashion-MNIST subset: seconds each.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import yaml

from openseer.commands import main
from openseer.config import build_config
from openseer.data.collection import open_collection
from openseer.model.init import kmeans_centroids, kmeans_sample_size, load_init, projected_features, read_init
from openseer.model.swav import build_swav
from openseer.train.checkpoint import latest_checkpoint, load_checkpoint
from openseer.train.distributed import DistEnv
from openseer.train.methods.swav import SwAVTraining, _global_crops
from tests.conftest import FAST, fmnist_available
from tests.use.kit import make_run

pytestmark = fmnist_available

RUN = [*FAST, "data.limit=256", "data.batch_size=64", "model.init_kmeans_images=256", "checkpoint.every=1000"]


def _source_run(tmp_path: Path) -> Path:
    """A run directory (one checkpoint in the training format) with the FAST model: run A."""
    return make_run(tmp_path / "A", arch="test_resnet", seed=7, overrides=tuple(RUN))


def _state(run: Path) -> dict:
    return latest_checkpoint(run)[1]["model"]


def _pretrain(*args: str) -> None:
    assert main(["pretrain", "--data", "fashion-mnist", *args, *RUN]) == 0


def test_the_first_step_uses_the_prototypes_of_the_run_it_starts_from(tmp_path):
    a = _source_run(tmp_path)
    source = _state(a)
    # before the first step: what the builder gives the loop is run A's model, every tensor
    cfg = build_config("tiny-cpu", [*RUN, f"model.init={a}"])
    build = SwAVTraining(cfg, DistEnv(), torch.device("cpu"))
    torch.manual_seed(cfg.seed)
    model = build.build_model()
    build.start_from(model, open_collection("fashion-mnist", limit=256))
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
    method = build.build_method(model, nullcontext)  # what the first step's Sinkhorn codes are scored against
    assert torch.equal(method.net.prototypes.weight, source["prototypes.layer.weight"])
    assert cfg.model.init_loaded == ["backbone", "head", "prototypes"] and cfg.model.init_fresh == []
    # a run: the prototypes are frozen for the first 4 steps, so after step 2 they are still A's (the
    # Sinkhorn codes of the first steps were computed with them); the backbone has moved (the LR warms
    # up from 0 at step 0)
    b = tmp_path / "B"
    _pretrain("--init", str(a), "--out", str(b), "--max-steps", "2")
    after = _state(b)
    assert torch.equal(after["prototypes.layer.weight"], source["prototypes.layer.weight"])
    assert not torch.equal(after["backbone.conv1.0.weight"], source["backbone.conv1.0.weight"])
    # what the run records: the file read, its SHA-256, what loaded and what started fresh
    ckpt = latest_checkpoint(a)[0]
    record = json.loads((b / "init.json").read_text())
    assert record["file"] == str(ckpt) and record["kind"] == "checkpoint"
    assert record["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert set(record["loaded"]) == {"backbone", "head", "prototypes"} and record["fresh"] == {}
    saved = yaml.safe_load((b / "config.yaml").read_text())["model"]
    assert saved["init"] == str(a) and saved["init_sha256"] == record["sha256"]
    assert saved["init_loaded"] == ["backbone", "head", "prototypes"] and saved["init_fresh"] == []
    # --init is not --resume: a new schedule from step 0; resuming B continues B, not A
    assert latest_checkpoint(b)[1]["step"] == 2 and latest_checkpoint(b)[1]["schedule"]["total_steps"] == 8
    assert main(["pretrain", "--resume", str(b), "--max-steps", "3"]) == 0
    assert latest_checkpoint(b)[1]["step"] == 3
    assert json.loads((b / "init.json").read_text()) == record


def test_prototypes_start_from_seeded_k_means_when_the_source_has_none(tmp_path, capsys):
    a = _source_run(tmp_path)
    exported = tmp_path / "a.safetensors"
    assert main(["export", str(a), "--out", str(exported)]) == 0
    runs = {}
    for name, seed in (("B", 0), ("C", 0), ("D", 1)):
        runs[name] = tmp_path / name
        _pretrain("--init", str(exported), "--out", str(runs[name]), "--max-steps", "1", f"seed={seed}")
    printed = capsys.readouterr().out
    assert "prototypes k-means (the source has none): spherical k-means of 256 projected features" in printed
    record = json.loads((runs["B"] / "init.json").read_text())
    assert record["loaded"] == {"backbone": len([k for k in _state(a) if k.startswith("backbone.")])}
    assert set(record["fresh"]) == {"head", "prototypes"} and "seed 0" in record["fresh"]["prototypes"]
    # the prototypes (frozen at step 1) are the k-means centroids of the projected features of the
    # first steps' global crops, recomputed here from the same start
    cfg = build_config("tiny-cpu", [*RUN, f"model.init={exported}"])
    torch.manual_seed(cfg.seed)
    model = build_swav(cfg)
    load_init(model, read_init(str(exported)), cfg)
    feats = projected_features(model, _global_crops(open_collection("fashion-mnist", limit=256), cfg),
                               kmeans_sample_size(cfg), torch.device("cpu"))
    assert feats.shape == (256, 32)
    expected = kmeans_centroids(feats, cfg.swav.n_prototypes, cfg.seed)
    protos = {n: _state(r)["prototypes.layer.weight"] for n, r in runs.items()}
    assert torch.allclose(protos["B"], expected, atol=1e-6)
    assert torch.equal(protos["B"], protos["C"])  # reproducible
    assert not torch.allclose(protos["B"], protos["D"], atol=1e-3)  # and seeded


def test_the_command_line_refuses_init_with_resume_and_a_missing_file(tmp_path, capsys):
    a = _source_run(tmp_path)
    assert main(["pretrain", "--resume", str(a), "--init", str(a)]) == 2
    assert "drop --data/--recipe/--out/--init" in capsys.readouterr().err
    assert main(["pretrain", "--init", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "B")]) == 2
    assert "model.init" in capsys.readouterr().err and not (tmp_path / "B").exists()


def test_a_changed_file_is_refused_when_the_config_pins_its_hash(tmp_path, capsys):
    a = _source_run(tmp_path)
    assert main(["pretrain", "--data", "fashion-mnist", "--init", str(a), "--out", str(tmp_path / "B"),
                 "--max-steps", "1", *RUN, "model.init_sha256=" + "ab" * 32]) == 2
    assert "not model.init_sha256=abab" in capsys.readouterr().err
    assert not (tmp_path / "B" / "config.yaml").exists()  # refused before the run directory is written


@pytest.mark.parametrize("part", ["head", "prototypes"])
def test_a_mismatched_part_is_refused_by_key_before_anything_is_written(tmp_path, capsys, part):
    a = _source_run(tmp_path)
    change = "model.head_out=16" if part == "head" else "swav.n_prototypes=12"
    assert main(["pretrain", "--data", "fashion-mnist", "--init", str(a), "--out", str(tmp_path / "B"),
                 "--max-steps", "1", *RUN, change]) == 2
    err = capsys.readouterr().err
    key = "head.mlp.3.weight: file (32, 64), expected (16, 64)" if part == "head" else \
        "prototypes.layer.weight: file (30, 32), expected (12, 32)"
    assert f"first mismatched key {key}" in err
    assert not (tmp_path / "B" / "config.yaml").exists()


@pytest.mark.slow
@pytest.mark.heavy  # three torchrun/process launches on 2 cores
def test_init_under_two_fsdp_ranks_and_from_their_sharded_checkpoint(tmp_path):
    """Two FSDP ranks: the whole tensors load before sharding, k-means runs on rank 0 and is broadcast
    (the prototypes equal one process's up to float summation order); a sharded .dcp of that run is
    itself a starting point, read in one process."""
    from tests.train.test_distributed import _openseer

    a = _source_run(tmp_path)
    exported = tmp_path / "a.safetensors"
    assert main(["export", str(a), "--out", str(exported)]) == 0
    common = ["--data", "fashion-mnist", "--init", str(exported), "--max-steps", "2", *RUN, "checkpoint.every=2",
              "threads=1"]
    two, one = tmp_path / "two", tmp_path / "one"
    r = _openseer(2, "pretrain", "--out", str(two), *common, "dist.strategy=fsdp")
    assert r.returncode == 0, r.stdout + r.stderr
    r = _openseer(1, "pretrain", "--out", str(one), *common)
    assert r.returncode == 0, r.stdout + r.stderr
    dcp = two / "checkpoints" / "step_00000002.dcp"
    sharded = load_checkpoint(dcp)["model"]
    whole = _state(one)
    assert torch.allclose(sharded["prototypes.layer.weight"], whole["prototypes.layer.weight"], atol=1e-4)
    assert json.loads((two / "init.json").read_text())["sha256"] == json.loads((one / "init.json").read_text())["sha256"]
    c = tmp_path / "c"
    _pretrain("--init", str(dcp), "--out", str(c), "--max-steps", "1")
    record = json.loads((c / "init.json").read_text())
    assert record["kind"] == "checkpoint" and set(record["loaded"]) == {"backbone", "head", "prototypes"}
    assert torch.equal(_state(c)["prototypes.layer.weight"], sharded["prototypes.layer.weight"])
