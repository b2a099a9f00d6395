"""Export: safetensors that timm loads as is, TorchScript and ONNX with the same outputs as PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import ImageFilter
from safetensors import safe_open

from openseer.commands import main
from openseer.model.load import load_backbone
from openseer.train.checkpoint import CheckpointError
from openseer.use.export import export, format_for
from tests.use.kit import make_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("export") / "run")


def _x(n=3, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(7))


def test_safetensors_export_loads_in_timm_without_remapping(run, tmp_path, capsys):
    out = tmp_path / "backbone.safetensors"
    assert main(["export", str(run), "--format", "safetensors", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["arch"] == "regnety_002"
    assert json.loads(meta["mean"]) == [0.286] * 3 and json.loads(meta["std"]) == [0.353] * 3
    assert meta["crop_size"] == "24" and json.loads(meta["input_size"]) == [3, 24, 24]
    assert json.loads(meta["config"])["model"]["arch"] == "regnety_002"
    net = timm.create_model("regnety_002", num_classes=0, pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(out))).eval()
    assert keys == set(net.state_dict())
    ref, _ = load_backbone(str(run))
    x = _x()
    with torch.no_grad():
        assert torch.equal(net(x), ref(x))
    # the older positional form still works
    assert main(["export", str(run), str(tmp_path / "again.safetensors")]) == 0


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated upstream
def test_torchscript_matches_pytorch_and_carries_metadata(run, tmp_path):
    out = tmp_path / "backbone.pt"
    r = export(run, out)  # format from the suffix
    assert r["format"] == "torchscript" and r["max_abs_diff"] < 1e-4
    extra = {"openseer.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    meta = json.loads(extra["openseer.json"])
    assert meta["arch"] == "regnety_002" and json.loads(meta["input_size"]) == [3, 24, 24]
    ref, _ = load_backbone(str(run))
    x = _x(5)
    with torch.no_grad():
        assert (loaded(x) - ref(x)).abs().max() < 1e-4


def test_onnx_matches_pytorch_in_onnxruntime(run, tmp_path, capsys):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    out = tmp_path / "backbone.onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(out), "--threads", "1"]) == 0
    assert "max |onnx - PyTorch|" in capsys.readouterr().out
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["arch"] == "regnety_002" and json.loads(props["std"]) == [0.353] * 3
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ref, _ = load_backbone(str(run))
    x = _x(4, size=24)  # another batch size than the export's example (the batch axis is dynamic); tiny-cpu crop 24
    got = torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])
    with torch.no_grad():
        diff = float((got - ref(x)).abs().max())
    assert diff < 1e-4


def test_format_errors_are_clear(run, tmp_path, capsys):
    with pytest.raises(CheckpointError, match="cannot tell the export format"):
        format_for(tmp_path / "x.bin")
    assert main(["export", str(run), "--out", str(tmp_path / "x.bin")]) == 2
    assert "--format" in capsys.readouterr().err
    assert main(["export", str(run)]) == 2
    assert "--out" in capsys.readouterr().err


def test_a_small_image_stem_travels_with_the_weights(tmp_path, capsys):
    """model.stem_stride=1: the run, its exported file and the random-init floor all use the same stem."""
    from openseer.eval.baselines import random_init

    run = make_run(tmp_path / "run", overrides=("model.stem_stride=1", "crops.sizes=[24,12]"))
    ref, info = load_backbone(str(run))
    stem = next(m for m in ref.modules() if isinstance(m, torch.nn.Conv2d))
    assert stem.stride == (1, 1) and info["stem_stride"] == 1
    out = tmp_path / "small.safetensors"
    assert main(["export", str(run), "--format", "safetensors", "--out", str(out)]) == 0
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["stem_stride"] == "1"
    again, _ = load_backbone(str(out))
    default, _ = load_backbone(str(out))
    x = _x(size=24)
    with torch.no_grad():
        assert torch.equal(again(x), ref(x))
        # the same weights with timm's stride-2 stem compute something else
        next(m for m in default.modules() if isinstance(m, torch.nn.Conv2d)).stride = (2, 2)
        assert not torch.allclose(default(x), ref(x))
    floor, finfo = random_init("regnety_002", 0, info["stem_stride"])
    assert next(m for m in floor.modules() if isinstance(m, torch.nn.Conv2d)).stride == (1, 1)
    with torch.no_grad():
        assert floor(torch.randn(2, 3, 24, 24)).shape == (2, ref.num_features)  # guard keeps 1x1 maps right


# ---------------------------------------------------------------- int8 ONNX


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("int8") / "run", arch="test_resnet")


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    from tests.conftest import write_pngs

    folder = tmp_path_factory.mktemp("calib")
    write_pngs(folder, 24, size=(30, 26))
    return folder


@pytest.mark.filterwarnings("ignore")
def test_int8_onnx_runs_in_onnxruntime_within_tolerance_of_fp32(small_run, calib, tmp_path, capsys):
    import onnx
    import onnxruntime as ort

    from openseer.use.api import load, prepare
    from tests.conftest import write_pngs

    out = tmp_path / "int8.onnx"
    assert main(["export", str(small_run), "--format", "onnx", "--int8", "--calibrate", str(calib),
                 "--calibrate-n", "16", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "calibrated on 16 images" in text and "cosine similarity mean" in text and "smaller" in text
    proto = onnx.load(str(out))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "BatchNormalization" not in ops  # QDQ, BN folded
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["arch"] == "test_resnet" and "int8 static" in meta["quantization"] and meta["crop_size"] == "24"
    # images the calibration did not see, through the eval transform: int8 stays close to fp32 PyTorch
    model = load(str(small_run))
    x = prepare([str(p) for p in write_pngs(tmp_path / "other", 40, size=(30, 26))[24:]], model.transform)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        ref = model.backbone(x)
    assert torch.nn.functional.cosine_similarity(got, ref, dim=1).min() > 0.98


@pytest.mark.filterwarnings("ignore")
def test_int8_export_refused_past_the_tolerance(small_run, calib, tmp_path, capsys):
    out = tmp_path / "int8.onnx"
    code = main(["export", str(small_run), "--format", "onnx", "--int8", "--calibrate", str(calib),
                 "--calibrate-n", "8", "--min-cosine", "1.01", "--out", str(out)])
    assert code == 1 and not out.exists()
    err = capsys.readouterr().err
    assert "below --min-cosine 1.01" in err
    assert "more of its 24 images (--calibrate-n 24)" in err  # 8 of 24 used: more can help


def test_int8_empty_calibration_set_or_wrong_format_one_message(small_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["export", str(small_run), "--int8", "--calibrate", str(empty), "--out", str(tmp_path / "a.onnx")])
    err = capsys.readouterr().err
    assert code != 0 and err.count("openseer: error:") == 1 and "calibration images" in err and "Traceback" not in err
    code = main(["export", str(small_run), "--int8", "--out", str(tmp_path / "b.onnx")])
    assert code != 0 and "--calibrate PILE" in capsys.readouterr().err
    code = main(["export", str(small_run), "--int8", "--calibrate", str(empty), "--out", str(tmp_path / "c.pt")])
    assert code != 0 and "ONNX only" in capsys.readouterr().err
    assert not any(tmp_path.glob("*.onnx")) and not any(tmp_path.glob("*.pt"))


def test_a_timm_folder_export_gives_timm_the_right_input_size_mean_std_and_features(tmp_path):
    """openseer export RUN --out DIR/: timm's hub layout (config.json + model.safetensors); a model built
    through timm ('local-dir:') and fed by timm's own resolve_data_config + create_transform gives
    openseer's features."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    import openseer

    run = make_run(tmp_path / "run", arch="regnety_002")  # 24-px crops, timm's own stem
    out = tmp_path / "exported"
    assert main(["export", str(run), "--out", f"{out}/"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "regnety_002" and cfg["pretrained_cfg"]["input_size"] == [3, 24, 24]
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    data_cfg = resolve_data_config({}, model=model)
    ours = openseer.load(run)
    assert tuple(data_cfg["input_size"]) == (3, 24, 24)
    assert list(data_cfg["mean"]) == pytest.approx(list(ours.transform.mean))
    assert list(data_cfg["std"]) == pytest.approx(list(ours.transform.std))
    transform = create_transform(**data_cfg)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(2))
              for _ in range(4)]
    with torch.no_grad():
        theirs = model(torch.stack([transform(im) for im in images])).numpy()
    mine = ours.embed(images)
    cos = (theirs * mine).sum(1) / (np.linalg.norm(theirs, axis=1) * np.linalg.norm(mine, axis=1))
    assert cos.min() > 0.99, cos
    back = openseer.load(out)  # openseer reads timm's folder back
    assert back.classes is None and np.allclose(back.embed(images), mine, atol=1e-6)
    # a stem timm cannot express is named where the export is written, and in config.json
    run1 = make_run(tmp_path / "run1", arch="regnety_002", overrides=("model.stem_stride=1",))
    r = export(run1, tmp_path / "exported1", "timm")
    assert "stride" in r["note"] and json.loads((tmp_path / "exported1" / "config.json").read_text())["openseer"]
