"""From a pile to a classifier, as a new user goes: select images to label, label them, finetune,
predict a folder (bad files counted), load it in Python, and read the linear head through timm."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

import openseer
from openseer.commands import main
from openseer.use.classifier import LinearProbs, read_head, save_classifier
from tests.data.corpus import write_corpus

COLOURS = {"red": (200, 30, 30), "green": (30, 170, 40), "blue": (40, 60, 210)}


def _pile(root: Path, per_class: int = 12) -> Path:
    """Three classes of 24-px images: a class colour with seeded noise and a random light square."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for name, rgb in COLOURS.items():
        for i in range(per_class):
            a = np.clip(np.array(rgb) + rng.normal(0, 25, (24, 24, 3)), 0, 255)
            y, x = rng.integers(0, 16, 2)
            a[y:y + 8, x:x + 8] = 230
            Image.fromarray(a.astype(np.uint8)).save(root / f"{name}_{i:02d}.png")
    return root


def _truth(path: str) -> str:
    return Path(path).name.split("_")[0]


@pytest.mark.slow
def test_select_label_finetune_predict_as_a_new_user(tmp_path, capsys):
    pile = _pile(tmp_path / "pile")
    assert main(["select", str(pile), "--model", "test_resnet", "--budget", "9", "--out", str(tmp_path / "sel"),
                 "--dup-by", "none", "--quiet"]) == 0
    chosen = list(csv.DictReader(open(tmp_path / "sel" / "to_label.csv", newline="")))
    assert len(chosen) == 9
    # the person labels the list (here: from the file names), as path,label
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([["path", "label"], *([r["path"], _truth(r["path"])] for r in chosen)])
    assert {_truth(r["path"]) for r in chosen} == set(COLOURS)  # typical picks cover the three classes

    clf = tmp_path / "clf"
    assert main(["finetune", "test_resnet", "--data", str(labels), "--pile", str(pile), "--out", str(clf),
                 "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "chose " in printed and "raw pixels on the same labels" in printed and "not tried: finetune" in printed
    report = json.loads((clf / "finetune.json").read_text())
    assert report["labelled"] == 9 and report["classes"] == sorted(COLOURS)
    assert report["pile"]["labelled_in_pile"] == 9 and report["choice"]["protocol"]
    est = report["choice"]["estimate"]
    assert est is None or est["low"] <= est["accuracy"] <= est["high"]

    # new images to predict: more of each class, and a corpus of awkward files (bad ones counted)
    new = _pile(tmp_path / "new", per_class=5)
    bad, good = write_corpus(new / "corpus", special=False)
    preds = tmp_path / "preds.csv"
    assert main(["predict", str(clf), "--data", str(new), "--out", str(preds), "--top", "2", "--quiet"]) == 0
    rows = list(csv.DictReader(open(preds, newline="")))
    bad_rows = list(csv.DictReader(open(tmp_path / "preds.bad.csv", newline="")))
    coloured = [r for r in rows if _truth(r["path"]) in COLOURS]
    assert len(coloured) == 15 and len(rows) + len(bad_rows) == 15 + len(bad) + len(good)  # each file once
    assert len(bad_rows) >= len(bad) - 2 and all(r["reason"] for r in bad_rows)
    assert len({r["key"] for r in rows}) == len(rows)
    assert list(rows[0])[:6] == ["path", "key", "class1", "prob1", "class2", "prob2"]
    right = np.mean([r["class1"] == _truth(r["path"]) for r in coloured])
    assert right >= 0.8, right
    assert not (tmp_path / "preds.csv.parts").exists()

    # the same classifier in Python: the same probabilities
    model = openseer.load(clf)
    assert model.classes == sorted(COLOURS)
    probs = model.predict([r["path"] for r in coloured[:4]])
    assert probs.shape == (4, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    for r, p in zip(coloured[:4], probs):
        assert model.classes[int(p.argmax())] == r["class1"] and abs(float(p.max()) - float(r["prob1"])) < 1e-3


def test_a_linear_head_on_the_last_stage_loads_into_timm_as_its_classifier(tmp_path):
    backbone = timm.create_model("test_resnet", num_classes=0, pretrained=False).eval()
    info = {"arch": "test_resnet", "crop_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "feature_dim":
            backbone.num_features}
    torch.manual_seed(0)
    head = LinearProbs(torch.randn(4, backbone.num_features), torch.randn(4))
    path = save_classifier(tmp_path / "clf", backbone, info, head, ["a", "b", "c", "d"], "last", "linear(l2=0.01)")
    tensors = load_file(str(path))
    assert {"fc.weight", "fc.bias"} <= set(tensors)  # timm's classifier name for a ResNet
    full = timm.create_model("test_resnet", num_classes=4, pretrained=False).eval()
    full.load_state_dict(tensors, strict=True)
    x = torch.randn(2, 3, 32, 32)
    read, classes, meta = read_head(path)
    with torch.no_grad():
        ours = read(backbone(x))
        theirs = torch.softmax(full(x), dim=1)
    assert classes == ["a", "b", "c", "d"] and meta["layer"] == "last"
    assert torch.allclose(ours, theirs, atol=1e-5)
    # a backbone-only loader reads the same file (the head's keys are left out)
    again = openseer.load(tmp_path / "clf")
    assert again.info["arch"] == "test_resnet" and again.classes == ["a", "b", "c", "d"]
