"""The long steps outside pretraining report through openseer.progress: plain lines in a file, no
carriage returns; and the CLI drops torch's CUDA warning on CPU-only machines."""

from __future__ import annotations

import io
import logging

import numpy as np
import torch

import openseer
from openseer.commands import NOISE, quiet_library_noise
from openseer.data.shards import write_shards
from openseer.eval.common import EvalTransform, Labelled
from openseer.eval.features import extract_features
from openseer.model.backbone import build_backbone


def test_sharding_reports_plain_lines_when_piped(png_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENSEER_PROGRESS", raising=False)
    summary = write_shards(png_folder, tmp_path / "shards", shard_size=2, show_progress=True,
                           log=lambda text: print(text))
    err = capsys.readouterr().err
    n = summary["counts"]["stored"]
    assert n >= 2 and f"shard: {n}/{n} input (100%)" in err and "done in" in err
    assert "\r" not in err
    write_shards(png_folder, tmp_path / "quiet", shard_size=2)  # no progress unless asked
    assert "shard:" not in capsys.readouterr().err


def test_feature_extraction_and_embed_report_plain_lines(monkeypatch):
    monkeypatch.setenv("OPENSEER_PROGRESS", "lines")
    monkeypatch.setenv("OPENSEER_PROGRESS_EVERY", "0")
    images = np.random.default_rng(0).integers(0, 256, (6, 1, 20, 20), dtype=np.uint8)
    data = Labelled.from_tensors(torch.from_numpy(images), np.zeros(6, dtype=np.int64), [str(i) for i in range(6)])
    net = build_backbone("test_resnet")
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    feats, bad = extract_features(net, data, EvalTransform(16, (0.5,) * 3, (0.25,) * 3), batch_size=4,
                                  desc="model train")
    model = openseer.load("test_resnet")
    emb = model.embed(list(images[:3, 0]), batch_size=2, progress=True)
    text = stream.getvalue()
    assert feats.shape[0] == 6 and not bad and emb.shape[0] == 3
    assert "model train: 4/6 img (67%)" in text and "model train: 6/6 img (100%)" in text
    assert "embed: 3/3 img (100%)" in text and "\r" not in text


def test_the_cli_drops_the_cuda_warning_of_torchs_extension_loader(caplog):
    quiet_library_noise()
    quiet_library_noise()  # idempotent: one filter per logger
    logger = logging.getLogger("torch.utils.cpp_extension")
    assert sum(type(f).__name__ == "_DropNoise" for f in logger.filters) == 1 and "torch.utils.cpp_extension" in NOISE
    with caplog.at_level(logging.WARNING, logger="torch.utils.cpp_extension"):
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        logger.warning("There are no %s version bounds defined for CUDA version %s", "g++", "13.0")
    assert [r.getMessage() for r in caplog.records] == ["There are no g++ version bounds defined for CUDA version 13.0"]
