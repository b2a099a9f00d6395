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
from openseer.model.checkpoint_file import latest_checkpoint
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


def _labels_csv(pile: Path, out: Path) -> Path:
    with open(out, "w", newline="") as f:
        csv.writer(f).writerows([["path", "label"], *([str(p), _truth(str(p))] for p in sorted(pile.glob("*.png")))])
    return out


@pytest.fixture
def tiny_model(tmp_path):
    from tests.use.kit import make_run

    return make_run(tmp_path / "model", arch="test_resnet")  # 24-px crops: fast


def test_auto_skips_full_finetune_with_its_reason_on_a_small_set(tmp_path, tiny_model, capsys):
    pile = _pile(tmp_path / "pile", per_class=3)  # 3 labels per class: no held-out fold to judge it on
    labels = _labels_csv(pile, tmp_path / "labels.csv")
    clf = tmp_path / "clf"
    assert main(["finetune", str(tiny_model), "--data", str(labels), "--out", str(clf), "--cache-dir",
                 str(tmp_path / "cache"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "not tried: finetune: full fine-tune: too few labels to judge it on a held-out fold" in printed
    full = json.loads((clf / "finetune.json").read_text())["full"]
    assert full["tried"] is False and full["kept"] is False and "smallest class has 3" in full["reason"]
    assert not (clf / "trial").exists() and not (clf / "config.yaml").exists()  # no run was started
    assert read_head(clf / "classifier.safetensors")[2]["protocol"].startswith(("linear", "knn"))
    for args, why in ((["--full", "no"], "--full no"), (["--minutes", "0"], "no time budget (--minutes 0)")):
        out = tmp_path / f"clf-{why[:6].strip('-')}"
        assert main(["finetune", str(tiny_model), "--data", str(labels), "--out", str(out), "--cache-dir",
                     str(tmp_path / "cache"), "--quiet", *args]) == 0
        assert json.loads((out / "finetune.json").read_text())["full"]["reason"] == why


@pytest.mark.slow
def test_full_finetune_writes_a_run_directory_and_a_classifier_that_predicts(tmp_path, tiny_model, capsys):
    pile = _pile(tmp_path / "pile", per_class=16)
    labels = _labels_csv(pile, tmp_path / "labels.csv")
    clf = tmp_path / "clf"
    args = ["finetune", str(tiny_model), "--data", str(labels), "--out", str(clf), "--cache-dir",
            str(tmp_path / "cache"), "--quiet", "--full", "yes", "--epochs", "3", "checkpoint.every=2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "full fine-tune (from linear" in printed and "finetune:" not in printed.split("not tried:")[-1]
    report = json.loads((clf / "finetune.json").read_text())
    full = report["full"]
    assert full["tried"] and full["kept"] and full["mode"] == "yes"
    trial = full["trial"]  # judged on the first fold of the same folds as the frozen protocols
    assert trial["held_out"] + trial["trained_on"] == 48 and trial["held_out"] >= 8
    assert trial["low"] <= trial["accuracy"] <= trial["high"] and trial["frozen"]["protocol"] == report["choice"]["protocol"]
    assert "the same held-out fold" in full["verdict"] and report["trained"].startswith("full fine-tune")
    # the run directories: the trial's and the final one, each with config, metrics and checkpoints
    for run, n in ((clf / "trial", trial["trained_on"]), (clf, 48)):
        assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file()
        path, state = latest_checkpoint(run)
        assert state["step"] == 3 * (n // 32) and "head.weight" in state["model"]
    # the classifier holds the fine-tuned backbone and head, with the class names
    tensors = load_file(str(clf / "classifier.safetensors"))
    _, state = latest_checkpoint(clf)
    assert torch.equal(tensors["fc.weight"], state["model"]["head.weight"])
    key = next(k for k in tensors if k.endswith("conv1.weight"))
    assert torch.equal(tensors[key], state["model"][f"backbone.{key}"])
    model = openseer.load(clf)
    assert model.classes == sorted(COLOURS) and read_head(clf / "classifier.safetensors")[2]["protocol"] == "finetune"
    paths = sorted(pile.glob("*.png"))[::8]
    probs = model.predict([str(p) for p in paths])
    assert probs.shape == (len(paths), 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    # a second run into the same folder is refused; --resume continues (here: nothing left to do)
    assert main(args) == 2
    assert "holds a fine-tune run already" in capsys.readouterr().err and not list(clf.glob("*.tmp"))
    assert main([*args, "--resume"]) == 0
    assert latest_checkpoint(clf)[1]["step"] == state["step"]


def test_full_finetune_is_judged_only_on_a_held_out_fold_big_enough():
    from openseer.eval.fewlabels import folds
    from openseer.use.finetune import _full_skip

    y = np.repeat(np.arange(3), 15)  # 5 folds of 9
    held, scheme = folds(y)
    assert _full_skip("auto", 10, "last", y, held, scheme) == ""
    assert _full_skip("no", 10, "last", y, held, scheme) == "--full no"
    assert _full_skip("auto", 0, "last", y, held, scheme) == "no time budget (--minutes 0)"
    assert "--layer is s3" in _full_skip("yes", 10, "s3", y, held, scheme)
    small = np.repeat(np.arange(3), [10, 10, 3])  # one class of 3: a held-out fold too thin to judge
    held, scheme = folds(small)
    assert "smallest class has 3" in _full_skip("auto", 10, "last", small, held, scheme)
    assert _full_skip("yes", 10, "last", small, held, scheme) == ""  # --full yes: fine-tune without a trial
    four = np.repeat(np.arange(2), 4)  # 4 per class, 4 folds of 2 images: fewer than 8 held out
    held, scheme = folds(four)
    assert "8 held-out images" in _full_skip("auto", 10, "last", four, held, scheme)
