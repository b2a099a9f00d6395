"""Fine-tuning (and training from scratch) on a labelled subset runs end to end."""

from __future__ import annotations

import numpy as np
import torch

from openseer.eval.common import EvalTransform, Labelled
from openseer.eval.lowshot import FinetuneSettings, auto_epochs, finetune
from openseer.model.load import load_backbone


def _blobs(n: int, seed: int) -> Labelled:
    """Two classes of 20x20 grayscale images: dark or bright, with noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    x = (60 + 120 * labels[:, None, None, None] + torch.randn(n, 1, 20, 20, generator=g) * 15).clamp(0, 255)
    return Labelled.from_tensors(x.to(torch.uint8), labels.numpy(), [f"blob:{seed}:{i}" for i in range(n)])


def test_finetune_and_scratch_run_end_to_end():
    model, info = load_backbone("regnety_002", random_init=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    transform = EvalTransform(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    train, test = _blobs(48, 0), _blobs(40, 1)
    s = FinetuneSettings(epochs=2, batch_size=16)
    r = finetune(model, "regnety_002", train, test, transform, 2, s, seed=0, progress=False)
    assert r["steps"] == 6 and r["images_seen"] == 96 and r["init"] == "pretrained"
    assert 0 <= r["top1"] <= 100 and r["top5"] == 100.0  # 2 classes: top-5 is trivially right
    assert np.isfinite(r["final_loss"])
    # the caller's backbone is left untouched (the fine-tune works on a copy)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    r2 = finetune(None, "regnety_002", train, test, transform, 2, s, seed=0, progress=False)
    assert r2["init"].startswith("random") and r2["lr_backbone"] == s.lr_scratch and r2["lr_head"] == s.lr_head


def test_auto_epochs_budget():
    assert auto_epochs(600) == 50 and auto_epochs(6000) == 10 and auto_epochs(60000) == 1 and auto_epochs(20) == 50
    assert auto_epochs(600, budget_images=6000) == 10 and auto_epochs(100000) == 1
