"""The full fine-tune method (train/methods/finetune.py) in the one loop: its loss falls on a few dozen
labelled images, a stopped run resumes bit for bit, the backbone trains slower than the head, batch-norm
statistics stay as pretrained, and the classes weigh the same whatever their counts."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from openseer.data.collection import TensorCollection
from openseer.model.checkpoint_file import latest_checkpoint
from openseer.rundir import read_metrics
from openseer.train.loop import train
from openseer.train.methods.finetune import Classifier, FinetuneStart, class_weights, finetune_config

COLOURS = np.array([(200, 30, 30), (30, 170, 40), (40, 60, 210)])


def _labelled(n: int = 36, seed: int = 0) -> tuple[TensorCollection, np.ndarray]:
    """``n`` 28-px images of 3 noisy colour classes, in memory."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = np.clip(COLOURS[y][:, :, None, None] + rng.normal(0, 60, (n, 3, 28, 28)), 0, 255).astype(np.uint8)
    return TensorCollection(torch.from_numpy(x), "colours"), y


def _start(coll, y) -> FinetuneStart:
    torch.manual_seed(0)
    backbone = timm.create_model("test_resnet", num_classes=0, pretrained=False).eval()
    d = backbone.num_features
    return FinetuneStart(backbone, np.zeros((3, d), np.float32), np.zeros(3, np.float32), coll, y, 3)


def _cfg(n: int, epochs: float, *extra: str):
    return finetune_config("test_resnet", 24, [0.5] * 3, [0.25] * 3, n, epochs=epochs, progress=False,
                           overrides=("log.every=1", "checkpoint.every=2", *extra))


def test_finetune_trains_in_the_one_loop_and_its_loss_falls(tmp_path):
    coll, y = _labelled()
    run = tmp_path / "run"
    summary = train(_cfg(len(y), 16, "optim.base_lr=2.0"), run, _start(coll, y).builder())
    assert summary["step"] == 16
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 17))
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    assert first == pytest.approx(np.log(3), abs=0.05)  # a zero head: uniform over 3 classes
    assert last < first - 0.3, (first, last)
    assert rows[-1]["train_accuracy"] > 0.6 and "train_accuracy" in rows[0]
    assert (run / "config.yaml").is_file() and (run / "schedule.json").is_file()
    path, state = latest_checkpoint(run)
    assert state["step"] == 16 and {"head.weight", "head.bias"} <= set(state["model"])
    assert len(state["optimizer"]["param_groups"]) == 2
    assert [g["lr_scale"] for g in state["optimizer"]["param_groups"]] == [0.1, 1.0]


def test_a_stopped_finetune_run_resumes_bit_exact(tmp_path):
    coll, y = _labelled(24)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    cfg = _cfg(len(y), 6)
    train(cfg, whole, _start(coll, y).builder())
    train(cfg, parts, _start(coll, y).builder(), max_steps=3)
    assert latest_checkpoint(parts)[1]["step"] == 3
    train(cfg, parts, _start(coll, y).builder(), resume=True)
    (pa, a), (pb, b) = latest_checkpoint(whole), latest_checkpoint(parts)
    assert a["step"] == b["step"] == 6 and pa.name == pb.name
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    for i, s in a["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])
    assert [r["loss"] for r in read_metrics(whole)] == [r["loss"] for r in read_metrics(parts)]


def test_backbone_is_slower_and_batch_norm_statistics_stay(tmp_path):
    coll, y = _labelled(24)
    run = tmp_path / "run"
    start = _start(coll, y)
    bn_before = {k: v.clone() for k, v in start.backbone.state_dict().items() if "running_" in k}
    train(_cfg(len(y), 2), run, start.builder())
    state = latest_checkpoint(run)[1]
    for k, v in bn_before.items():
        assert torch.equal(state["model"][f"backbone.{k}"], v), k
    groups = state["optimizer"]["param_groups"]
    assert groups[0]["lr"] == pytest.approx(0.1 * groups[1]["lr"]) and groups[1]["lr"] > 0
    clf = Classifier(start.backbone, torch.zeros(3, start.weight.shape[1]), torch.zeros(3)).train()
    assert clf.training and clf.head.training
    assert all(not m.training for m in clf.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_class_weights_make_classes_weigh_the_same():
    w = class_weights(np.array([0] * 8 + [1] * 2 + [2] * 2), 4)
    assert w.tolist() == pytest.approx([0.375, 1.5, 1.5, 0.0])
    counts = np.array([8, 2, 2])
    assert (w[:3].numpy() * counts).tolist() == pytest.approx([3.0, 3.0, 3.0])
