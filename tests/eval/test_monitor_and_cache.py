"""The pretraining kNN monitor, and the feature cache."""

from __future__ import annotations

import numpy as np
import torch

from openseer.config import build_config
from openseer.eval.common import EvalTransform, Labelled
from openseer.eval.features import backbone_features, cache_dir
from openseer.eval.monitor import knn_monitor
from openseer.model.backbone import build_backbone
from openseer.model.load import load_backbone

from ..conftest import fmnist_available


@fmnist_available
def test_knn_monitor():
    cfg = build_config("tiny-cpu", ["monitor.data=fashion-mnist", "monitor.n_train=300", "monitor.n_test=100",
                                    "monitor.k=10"])
    backbone = build_backbone("regnety_002", zero_init_last=False).train()
    r = knn_monitor(backbone, cfg, "cpu")
    assert 10.0 < r["knn_top1"] <= 100.0 and r["knn_k"] == 10
    assert backbone.training  # mode restored
    assert knn_monitor(backbone, cfg, "cpu")["knn_top1"] == r["knn_top1"]  # same images each call


def test_features_are_cached_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENSEER_CACHE", str(tmp_path / "envcache"))
    assert cache_dir() == tmp_path / "envcache"
    assert cache_dir(tmp_path / "x") == tmp_path / "x"
    model, info = load_backbone("regnety_002", random_init=True)
    imgs = torch.randint(0, 255, (40, 1, 28, 28), dtype=torch.uint8)
    data = Labelled.from_tensors(imgs, np.arange(40) % 4, [f"r:{i}" for i in range(40)])
    t = EvalTransform(32, (0.5,) * 3, (0.25,) * 3)
    a, bad, hit = backbone_features(model, info["weights_hash"], data, t, cache_dir(), batch_size=16, progress=False)
    assert not hit and not bad and a.shape == (40, 368)
    b, _, hit = backbone_features(model, info["weights_hash"], data, t, cache_dir(), batch_size=16, progress=False)
    assert hit and isinstance(b, np.memmap) and np.array_equal(a, b)
    assert len(list((tmp_path / "envcache").glob("*.npy"))) == 1
    # another transform is another cache entry
    _, _, hit = backbone_features(model, info["weights_hash"], data, EvalTransform(28, (0.5,) * 3, (0.25,) * 3),
                                  cache_dir(), progress=False)
    assert not hit


def test_eval_transform_rules():
    t = EvalTransform(32, (0.0,) * 3, (1.0,) * 3)
    small = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
    out = t.geometry(small)
    assert out.shape == (2, 3, 32, 32) and torch.allclose(out, torch.ones_like(out))
    big = torch.zeros(1, 3, 100, 200, dtype=torch.uint8)
    big[..., :, 90:110] = 255  # a bright centre stripe survives the centre crop
    out = t.geometry(big)
    assert out.shape == (1, 3, 32, 32) and out[0, 0, 16, 16] > 0.9 and out[0, 0, 16, 0] < 0.1
