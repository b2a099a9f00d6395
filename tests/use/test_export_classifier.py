"""`openseer export CLF`: a classifier from `openseer finetune` exported whole (backbone + head + class
names) in every format, with the same logits as openseer's, read back by timm and by `openseer.load`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open

import openseer
from openseer.commands import main
from openseer.eval.fewlabels import KnnHead, fit_linear
from openseer.use.api import prepare
from openseer.use.classifier import head_module, save_classifier
from openseer.use.export import export
from tests.use.kit import make_run

COLOURS = {"red": (200, 30, 30), "green": (30, 170, 40), "blue": (40, 60, 210)}
CLASSES = sorted(COLOURS)


def _colours(root: Path, per_class: int, seed: int) -> list[Path]:
    """Images of three colour classes (noise and a light square), 30 x 26 px."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rgb in COLOURS.items():
        for i in range(per_class):
            a = np.clip(np.array(rgb) + rng.normal(0, 25, (26, 30, 3)), 0, 255)
            y, x = rng.integers(0, 16, 2)
            a[y:y + 8, x:x + 8] = 230
            paths.append(root / f"{name}_{i:02d}.png")
            Image.fromarray(a.astype(np.uint8)).save(paths[-1])
    return paths


def _label(path: Path) -> str:
    return path.name.split("_")[0]


def _classifiers(root: Path, arch: str, paths: list[Path], mid_layer: str) -> dict:
    """Two classifiers on a tiny run's features, as `finetune` writes them: a linear head on the last
    stage (``clf``) and a kNN head on ``mid_layer`` (``knn``)."""
    run = make_run(root / "run", arch=arch)  # 24-px crops
    y = np.array([CLASSES.index(_label(p)) for p in paths])
    last = openseer.load(run)
    x = last.embed(paths)
    linear = head_module(fit_linear(x, y, 3, l2=0.01))
    save_classifier(root / "clf", last.backbone, last.info, linear, CLASSES, "last", "linear(l2=0.01)",
                    extra={"labelled": len(y)})
    mid = openseer.load(run, layer=mid_layer)
    xm = mid.embed(paths)
    knn = head_module(KnnHead(xm / np.linalg.norm(xm, axis=1, keepdims=True), y, 3, k=5))
    save_classifier(root / "knn", mid.backbone, mid.info, knn, CLASSES, mid_layer, "knn(k=5)")
    return {"clf": root / "clf", "knn": root / "knn"}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Labelled colour images, new ones to predict, and classifiers on a RegNet (timm's ``head.fc``)."""
    root = tmp_path_factory.mktemp("clfexport")
    paths = _colours(root / "labelled", 8, seed=0)
    return {**_classifiers(root / "regnet", "regnety_002", paths, "s3+s4"), "calib": root / "labelled",
            "new": _colours(root / "new", 4, seed=1), "paths": paths}


@pytest.fixture(scope="module")
def small(made, tmp_path_factory):
    """The same on timm's test_resnet (``fc``): quick to export to ONNX."""
    return {**made, **_classifiers(tmp_path_factory.mktemp("small"), "test_resnet", made["paths"], "layer2+layer3")}


def _logits(clf: openseer.Model, images) -> np.ndarray:
    """openseer's own logits: the linear head's layer on openseer's features."""
    head = clf._head()[0]
    with torch.no_grad():
        return head.fc(torch.from_numpy(clf.embed(images))).numpy()


def test_safetensors_and_timm_folder_hold_the_whole_classifier_and_load_back(made, tmp_path, capsys):
    clf = openseer.load(made["clf"])
    probs = clf.predict(made["new"])
    assert np.mean([CLASSES[i] == _label(p) for i, p in zip(probs.argmax(1), made["new"])]) >= 0.8

    out = tmp_path / "clf.safetensors"
    assert main(["export", str(made["clf"]), "--out", str(out)]) == 0
    assert "3 classes: blue, green, red; logits" in capsys.readouterr().out
    with safe_open(str(out), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert {"head.fc.weight", "head.fc.bias"} <= keys  # timm's classifier keys for RegNet
    assert json.loads(meta["classes"]) == CLASSES and meta["num_classes"] == "3" and meta["head"] == "linear"
    assert meta["format"] == "openseer.classifier.v1" and json.loads(meta["input_size"]) == [3, 24, 24]
    assert meta["protocol"] == "linear(l2=0.01)" and json.loads(meta["about"]) == {"labelled": 24}
    assert meta["weights_hash"] == clf.info["weights_hash"]  # the backbone it holds
    with safe_open(str(made["clf"] / "classifier.safetensors"), framework="pt") as f:
        assert f.metadata()["weights_hash"] == clf.info["weights_hash"]
    net = timm.create_model("regnety_002", num_classes=3).eval()
    net.load_state_dict(_tensors(out), strict=True)  # timm's own model with num_classes=3 takes it as is
    with torch.no_grad():
        assert np.abs(net(prepare(made["new"], clf.transform)).numpy() - _logits(clf, made["new"])).max() < 1e-4
    again = openseer.load(out)  # the exported file reads back as a classifier
    assert again.classes == CLASSES and np.allclose(again.predict(made["new"]), probs, atol=1e-6)
    r = clf.export(tmp_path / "api.safetensors")  # the Python API exports the classifier whole too
    assert r["classifier"] and openseer.load(r["path"]).classes == CLASSES

    folder = tmp_path / "timm"
    assert main(["export", str(made["clf"]), "--out", f"{folder}/"]) == 0
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["num_classes"] == 3 and cfg["label_names"] == CLASSES
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert model.num_classes == 3 and list(model.pretrained_cfg["label_names"]) == CLASSES
    assert timm.create_model(f"local-dir:{folder}").num_classes == 3  # the right head without weights too
    x = prepare(made["new"], clf.transform)
    with torch.no_grad():
        theirs = model(x).numpy()
    assert np.abs(theirs - _logits(clf, made["new"])).max() < 1e-4
    assert np.allclose(torch.softmax(torch.from_numpy(theirs), 1).numpy(), probs, atol=1e-5)
    back = openseer.load(folder)  # and openseer reads timm's folder back as the classifier
    assert back.classes == CLASSES and np.allclose(back.predict(made["new"]), probs, atol=1e-6)


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.filterwarnings("ignore")
def test_torchscript_and_onnx_give_openseers_logits_and_carry_the_class_names(made, small, tmp_path, capsys):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    clf = openseer.load(small["clf"])
    x = prepare(made["new"], clf.transform)
    ref = _logits(clf, made["new"])

    ts = tmp_path / "clf.pt"
    r = export(small["clf"], ts)
    assert r["output"] == "logits" and r["max_abs_diff"] < 1e-5 and r["top1_agreement"] == 1.0
    extra = {"openseer.json": ""}
    loaded = torch.jit.load(str(ts), _extra_files=extra)
    assert json.loads(json.loads(extra["openseer.json"])["classes"]) == CLASSES
    with torch.no_grad():
        got = loaded(x).numpy()
    assert np.abs(got - ref).max() < 1e-5 and (got.argmax(1) == ref.argmax(1)).all()

    out = tmp_path / "clf.onnx"
    assert main(["export", str(small["clf"]), "--out", str(out), "--threads", "1"]) == 0
    assert "top-1 class the same for 100% of the batch" in capsys.readouterr().out
    proto = onnx.load(str(out))
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["classes"]) == CLASSES and props["head"] == "linear" and "logits" in props["output"]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.get_outputs()[0].name == "logits"
    got = sess.run(None, {"images": x.numpy()})[0]
    assert np.abs(got - ref).max() < 1e-4 and (got.argmax(1) == ref.argmax(1)).all()


@pytest.mark.filterwarnings("ignore")
def test_a_knn_classifier_exports_with_its_bank_and_gives_probabilities(small, tmp_path, capsys):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    made = small
    clf = openseer.load(made["knn"])
    assert clf.layer == "layer2+layer3"
    x = prepare(made["new"], clf.transform)
    probs = clf.predict(made["new"])
    out = tmp_path / "knn.onnx"
    r = export(made["knn"], out)
    assert r["output"] == "probabilities" and r["max_abs_diff"] < 1e-4 and r["head"] == "knn"
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.get_outputs()[0].name == "probabilities"
    got = sess.run(None, {"images": x.numpy()})[0]  # the bank travels inside the file
    assert np.abs(got - probs).max() < 1e-4 and (got.argmax(1) == probs.argmax(1)).all()
    ts = tmp_path / "knn.pt"
    export(made["knn"], ts)
    with torch.no_grad():
        assert np.abs(torch.jit.load(str(ts))(x).numpy() - probs).max() < 1e-5
    st = tmp_path / "knn.safetensors"
    export(made["knn"], st)
    again = openseer.load(st)
    assert again.classes == CLASSES and again.layer == "layer2+layer3"
    assert np.allclose(again.predict(made["new"]), probs, atol=1e-6)
    # timm has no kNN head and VISSL no classifier: one message each, with what to do instead
    assert main(["export", str(made["knn"]), "--out", f"{tmp_path / 'timm'}/"]) == 2
    err = capsys.readouterr().err
    assert "kNN head" in err and "--backbone-only" in err and "Traceback" not in err
    assert main(["export", str(made["knn"]), "--out", str(tmp_path / "k.torch")]) == 2
    assert "--backbone-only" in capsys.readouterr().err
    # --backbone-only: the backbone alone, as from a run
    bb = tmp_path / "backbone.safetensors"
    assert main(["export", str(made["knn"]), "--backbone-only", "--out", str(bb)]) == 0
    with safe_open(str(bb), framework="pt") as f:
        assert f.metadata()["format"] == "openseer.backbone.v1" and not any(k.startswith("knn") for k in f.keys())
    assert openseer.load(bb).classes is None


@pytest.mark.filterwarnings("ignore")
def test_int8_classifier_keeps_the_top1_class_and_a_refusal_says_what_can_work(small, tmp_path, capsys):
    made = small
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    out = tmp_path / "int8.onnx"
    assert main(["export", str(made["clf"]), "--int8", "--calibrate", str(made["calib"]), "--calibrate-n", "24",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "top-1 class the same for" in text and "of 24 images" in text
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["classes"]) == CLASSES and "int8 static" in props["quantization"]
    assert "the head's" in props["quantization"]  # the head stays in fp32
    clf = openseer.load(made["clf"])
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: prepare(made["new"], clf.transform).numpy()})[0]
    assert (got.argmax(1) == clf.predict(made["new"]).argmax(1)).mean() >= 0.9  # images calibration did not see

    # a kNN classifier quantises too (its vote stays fp32); refused here: every calibration image was
    # used, so the advice is not "more of them"
    code = main(["export", str(made["knn"]), "--int8", "--calibrate", str(made["calib"]), "--calibrate-n", "100",
                 "--min-agreement", "1.01", "--out", str(out)])
    text, err = capsys.readouterr()
    assert "probabilities" in text and "top-1 class the same for 100.0% of 24 images" in text
    assert code == 1 and not out.exists() and "below --min-agreement 1.01" in err
    assert "all 24 readable calibration images were used" in err.lower() and "--calibrate-n" not in err
    assert "keep the fp32 ONNX export" in err
