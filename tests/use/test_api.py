"""The Python API: openseer.load -> Model with .embed, .backbone, .export, .evaluate; lazy imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.regnet import RegNet

import openseer
from openseer.data.decode import BadImage
from tests.conftest import fmnist_available
from tests.use.kit import image_folder, make_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("api") / "run")


def test_import_openseer_is_lazy():
    code = "import sys, openseer; assert callable(openseer.load); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_load_embed_and_backbone(run, tmp_path):
    paths = sorted(image_folder(tmp_path / "imgs", n=3).rglob("*.png"))
    model = openseer.load(run)
    assert isinstance(model.backbone, RegNet) and model.arch == "regnety_002" and "regnety_002" in repr(model)
    emb = model.embed([str(p) for p in paths])
    assert emb.shape == (len(paths), 368) and emb.dtype == np.float32
    # PIL images, arrays and tensors give the same rows as the files
    pil = [Image.open(p).convert("RGB") for p in paths]
    np.testing.assert_allclose(model.embed(pil), emb, atol=1e-5)
    np.testing.assert_allclose(model.embed([np.asarray(pil[0])]), emb[:1], atol=1e-5)
    t = torch.from_numpy(np.asarray(pil[1]).copy()).permute(2, 0, 1)
    np.testing.assert_allclose(model.embed(t), emb[1:2], atol=1e-5)  # one image alone
    np.testing.assert_allclose(model.embed(t.float() / 255), emb[1:2], atol=1e-4)  # float in [0, 1]
    # .backbone is the plain timm module: pooled features out of normalised images
    from openseer.use.api import prepare

    with torch.no_grad():
        direct = model.backbone(prepare([paths[0]], model.transform)).numpy()
    np.testing.assert_allclose(direct, emb[:1], atol=1e-5)
    unit = model.embed(paths, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(BadImage, match="bad.png"):
        model.embed([tmp_path / "bad.png"])


def test_export_then_load_the_export_and_a_timm_name(run, tmp_path):
    model = openseer.load(run)
    r = model.export(tmp_path / "b.safetensors")
    assert r["format"] == "safetensors"
    again = openseer.load(tmp_path / "b.safetensors")
    assert again.info["weights_hash"] == model.info["weights_hash"] and again.transform == model.transform
    fresh = openseer.load("regnety_002")  # a timm name: random weights, nothing downloaded
    assert fresh.info["random_init"] and fresh.feature_dim == 368


def test_evaluate_delegates_to_the_eval_runner(run, tmp_path, monkeypatch):
    import openseer.eval.runner as runner

    seen = {}

    def fake(opts):
        seen["opts"] = opts
        return {"results": []}

    monkeypatch.setattr(runner, "evaluate", fake)
    model = openseer.load(run)
    assert model.evaluate("fashion-mnist", protocols=("knn",), limit_train=100) == {"results": []}
    opts = seen["opts"]
    assert opts.weights == str(run) and opts.protocols == ("knn",) and opts.limit_train == 100
    assert opts.layer == "last"
    openseer.load(run, layer="s3+s4").evaluate("fashion-mnist")  # the Model's layer is the default
    assert seen["opts"].layer == "s3+s4"
    # a model built in Python is evaluated through a temporary export of its weights
    loose = openseer.use.api.Model(model.backbone, {k: v for k, v in model.info.items()})
    loose.evaluate("fashion-mnist")
    assert seen["opts"].weights.endswith("backbone.safetensors")


@fmnist_available
def test_evaluate_for_real_on_a_small_fashion_mnist_subset(run, tmp_path):
    model = openseer.load(run)
    doc = model.evaluate("fashion-mnist", out=tmp_path / "eval.json", protocols=("knn",), ks=(5,),
                         limit_train=300, limit_test=100, no_cache=True, progress=False)
    assert doc["results"][0]["protocol"] == "knn" and (tmp_path / "eval.json").is_file()


@fmnist_available
def test_readme_example_runs(run, tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Use the features", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'openseer.load("runs/demo")' in code
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENSEER_CACHE", str(tmp_path / "cache"))
    env: dict = {}
    exec(compile(code.replace("runs/demo", str(run)), "README.md", "exec"), env)
    assert env["emb"].shape == (8, 368) and (tmp_path / "backbone.safetensors").is_file()
    assert env["report"]["results"][0]["protocol"] == "knn" and (tmp_path / "knn" / "eval.json").is_file()
