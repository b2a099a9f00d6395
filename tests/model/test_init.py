"""Starting weights for a SwAV model (model/init.py): each load path with a known answer.

Backbone only (an exported file), backbone + head + prototypes (an openseer checkpoint and SEER's
released VISSL layout, written here from a small RegNetY), a width or architecture mismatch named by
key and shapes, the stem adapted from 3 channels to 1 as timm adapts it, and the k-means centroids.
"""

from __future__ import annotations

import hashlib

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models import adapt_input_conv

from openseer.commands import main
from openseer.config import ConfigError, build_config
from openseer.model.init import (
    InitError,
    check_hash,
    kmeans_centroids,
    load_init,
    read_init,
    sha256_of,
)
from openseer.model.swav import build_swav
from openseer.model.vissl_layout import timm_key_to_vissl

# a SEER-like head (no BN, one hidden layer) on a small RegNetY; 368-d pooled features
SEER_LIKE = ["model.arch=regnety_002", "model.head_hidden=[64]", "model.head_out=32", "model.head_bn=false",
             "swav.n_prototypes=20", "model.zero_init_last=false", "model.stem_stride=0",
             "model.channels_last=false"]


def _model(*overrides: str, seed: int = 0):
    cfg = build_config("tiny-cpu", [*SEER_LIKE, *overrides])
    torch.manual_seed(seed)
    return build_swav(cfg).eval(), cfg


def _vissl_file(path, model) -> None:
    """A SwAV model written as SEER released theirs: classy_state_dict.base_model.model.{trunk, heads},
    VISSL's trunk names and SwAVPrototypesHead's names (projection_head.N, prototypes0)."""
    trunk = {timm_key_to_vissl(k): v.clone() for k, v in model.backbone.state_dict().items()}
    heads = {f"0.projection_head.{k[len('mlp.'):]}": v.clone() for k, v in model.head.state_dict().items()}
    heads["0.prototypes0.weight"] = model.prototypes.layer.weight.detach().clone()
    torch.save({"classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": heads}}},
                "iteration": 1000, "type": "checkpoint"}, path)


def _equal_states(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_backbone_only_from_an_exported_file_leaves_head_and_prototypes_fresh(tmp_path):
    source, _ = _model(seed=1)
    f = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in source.backbone.state_dict().items()}, str(f), metadata={"arch": "regnety_002"})
    model, cfg = _model(seed=2)
    fresh_head = {k: v.clone() for k, v in model.head.state_dict().items()}
    src = read_init(str(f))
    assert src.kind == "safetensors" and not src.head
    result = load_init(model, src, cfg)
    assert result["loaded"] == {"backbone": len(source.backbone.state_dict())}
    assert set(result["fresh"]) == {"head", "prototypes"} and "k-means" in result["fresh"]["prototypes"]
    assert _equal_states(model.backbone, source.backbone)
    assert all(torch.equal(v, fresh_head[k]) for k, v in model.head.state_dict().items())


def test_seer_layout_with_heads_loads_every_trunk_head_and_prototype_key(tmp_path):
    source, _ = _model(seed=1)
    f = tmp_path / "seer_regnet_model_iteration1000.torch"
    _vissl_file(f, source)
    model, cfg = _model(seed=2)
    src = read_init(str(f))
    assert src.kind == "vissl"
    result = load_init(model, src, cfg)
    assert result["loaded"] == {"backbone": len(source.backbone.state_dict()), "head": 4, "prototypes": 1}
    assert result["fresh"] == {}
    assert _equal_states(model, source)  # every tensor, prototypes bit for bit
    x = [torch.randn(4, 3, 32, 32)]
    with torch.no_grad():
        assert torch.equal(model(x)[1], source(x)[1])


def test_import_seer_keep_head_writes_a_file_init_reads_whole_and_load_reads_as_a_backbone(tmp_path, capsys):
    import openseer

    source, _ = _model(seed=1)
    _vissl_file(tmp_path / "seer.torch", source)
    out = tmp_path / "seer-swav.safetensors"
    assert main(["import-seer", str(tmp_path / "seer.torch"), "--keep-head", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "kept the SwAV head and 20 prototypes" in printed
    assert "model.head_hidden=[64] model.head_out=32 model.head_bn=false swav.n_prototypes=20" in printed
    assert "dropped" not in printed
    model, cfg = _model(seed=3)
    result = load_init(model, read_init(str(out)), cfg)
    assert set(result["loaded"]) == {"backbone", "head", "prototypes"} and _equal_states(model, source)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # openseer.load (eval, embed, export) still reads it as a backbone
        assert torch.equal(openseer.load(out).backbone(x), source.backbone(x))
    # without --keep-head the head is dropped, as before
    assert main(["import-seer", str(tmp_path / "seer.torch"), "--out", str(tmp_path / "b.safetensors")]) == 0
    assert "dropped 5 non-backbone tensors" in capsys.readouterr().out
    assert not read_init(str(tmp_path / "b.safetensors")).head


def test_a_width_mismatched_head_is_refused_by_key_and_shapes(tmp_path):
    source, _ = _model(seed=1)
    _vissl_file(tmp_path / "seer.torch", source)
    model, cfg = _model("model.head_hidden=[48]", seed=2)
    with pytest.raises(InitError) as e:
        load_init(model, read_init(str(tmp_path / "seer.torch")), cfg)
    msg = str(e.value)
    assert "SwAV projection head does not fit" in msg
    assert "first mismatched key head.mlp.0.weight: file (64, 368), expected (48, 368)" in msg
    assert "model.head_hidden=[64]" in msg and "model.init_parts=[backbone]" in msg
    # started fresh on request: the backbone loads, head and prototypes do not
    cfg.model.init_parts = ["backbone"]
    result = load_init(model, read_init(str(tmp_path / "seer.torch")), cfg)
    assert list(result["loaded"]) == ["backbone"] and "not in model.init_parts" in result["fresh"]["head"]


def test_another_architecture_is_refused_naming_the_first_differing_key(tmp_path):
    source, _ = _model(seed=1)
    _vissl_file(tmp_path / "seer.torch", source)
    model, cfg = _model("model.arch=regnety_004")
    with pytest.raises(InitError) as e:
        load_init(model, read_init(str(tmp_path / "seer.torch")), cfg)
    msg = str(e.value)
    assert "backbone (for regnety_004) does not fit" in msg
    assert ("first mismatched key s1.b1.conv1.conv.weight (file key _feature_blocks.res2.block1-0.f.a.0.weight): "
            "file (24, 32, 1, 1), expected (48, 32, 1, 1)") in msg
    assert "The file holds regnety_002: set model.arch=regnety_002" in msg


def test_prototypes_of_another_count_are_refused_and_can_start_from_k_means(tmp_path):
    source, _ = _model(seed=1)
    _vissl_file(tmp_path / "seer.torch", source)
    model, cfg = _model("swav.n_prototypes=30")
    with pytest.raises(InitError, match=r"first mismatched key prototypes.layer.weight: file \(20, 32\), expected "
                                        r"\(30, 32\).*swav.n_prototypes=20"):
        load_init(model, read_init(str(tmp_path / "seer.torch")), cfg)
    cfg.model.init_parts = ["backbone", "head"]
    result = load_init(model, read_init(str(tmp_path / "seer.torch")), cfg)
    assert set(result["loaded"]) == {"backbone", "head"} and "k-means (not in model.init_parts)" == result["fresh"]["prototypes"]


def test_rgb_stem_adapted_to_one_channel_as_timm_does(tmp_path):
    source, _ = _model(seed=1)
    _vissl_file(tmp_path / "seer.torch", source)
    model, cfg = _model("model.in_chans=1", seed=2)
    assert model.backbone.stem.conv.weight.shape[1] == 1
    result = load_init(model, read_init(str(tmp_path / "seer.torch")), cfg)
    assert result["adapted"] == ["stem.conv.weight: 3 -> 1 input channels (timm adapt_input_conv)"]
    w = source.backbone.stem.conv.weight
    assert torch.equal(model.backbone.stem.conv.weight, adapt_input_conv(1, w))
    assert torch.allclose(model.backbone.stem.conv.weight, w.sum(dim=1, keepdim=True))
    # known answer: a gray image through the adapted stem = the same image as RGB through the source's
    gray = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.backbone(gray), source.backbone(gray.repeat(1, 3, 1, 1)), atol=1e-5)
    with pytest.raises(ConfigError, match="in_chans must be 1"):  # the reader gives 1 or 3 channels
        _model("model.in_chans=4", seed=2)


def test_kmeans_centroids_are_faiss_spherical_seeded_and_reproducible():
    gen = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(8, 16, generator=gen), dim=1)
    feats = F.normalize(centres.repeat(50, 1) + 0.05 * torch.randn(400, 16, generator=gen), dim=1)
    c = kmeans_centroids(feats, 8, seed=3)
    assert c.shape == (8, 16) and torch.allclose(c.norm(dim=1), torch.ones(8), atol=1e-5)
    assert torch.equal(c, kmeans_centroids(feats, 8, seed=3))  # seeded: the same centroids again
    km = faiss.Kmeans(16, 8, niter=20, seed=3, spherical=True, verbose=False, max_points_per_centroid=256)
    km.train(np.ascontiguousarray(feats.numpy()))
    assert torch.allclose(c, F.normalize(torch.from_numpy(km.centroids), dim=1))
    # the planted centres are found (k-means may merge a pair into one centroid, as here in one place)
    assert ((centres @ c.T).max(dim=1).values > 0.99).sum() >= 6
    with pytest.raises(InitError, match="at least 8 features"):
        kmeans_centroids(feats[:5], 8, seed=3)


def test_the_file_hash_is_recorded_and_checked(tmp_path):
    source, cfg = _model(seed=1)
    f = tmp_path / "seer.torch"
    _vissl_file(f, source)
    assert sha256_of(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    src = read_init(str(f))
    assert check_hash(cfg, src) == sha256_of(f)
    cfg.model.init_sha256 = "0" * 64
    with pytest.raises(InitError, match="has SHA-256 .* not model.init_sha256=0000"):
        check_hash(cfg, src)
    with pytest.raises(InitError, match="does not exist"):
        read_init(str(tmp_path / "nope.torch"))


def test_a_run_with_one_input_channel_loads_as_a_one_channel_backbone(tmp_path):
    import openseer
    from tests.use.kit import make_run

    run = make_run(tmp_path / "gray", overrides=("model.in_chans=1",))
    model = openseer.load(run)
    assert model.backbone.stem.conv.weight.shape[1] == 1
    with torch.no_grad():
        assert model.backbone(torch.rand(2, 1, 32, 32)).shape == (2, 368)


def test_a_finetuned_classifier_folder_gives_its_backbone_without_the_class_head(tmp_path):
    from openseer.use.classifier import LinearProbs, save_classifier

    source, _ = _model(seed=1)
    info = {"arch": "regnety_002", "crop_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}
    save_classifier(tmp_path / "clf", source.backbone, info, LinearProbs(torch.randn(5, 368), torch.zeros(5)),
                    [str(i) for i in range(5)], "last", "linear")
    src = read_init(str(tmp_path / "clf"))
    assert src.file.name == "classifier.safetensors" and not src.head
    model, cfg = _model(seed=2)
    assert load_init(model, src, cfg)["loaded"] == {"backbone": len(source.backbone.state_dict())}
    assert _equal_states(model.backbone, source.backbone)


def test_a_timm_state_dict_with_its_classifier_gives_the_backbone(tmp_path):
    import timm

    torch.manual_seed(1)
    full = timm.create_model("regnety_002", num_classes=10, zero_init_last=False)
    torch.save(full.state_dict(), tmp_path / "timm.pth")
    src = read_init(str(tmp_path / "timm.pth"))
    assert src.kind == "state_dict" and not any(k.startswith("head.fc.") for k in src.backbone)
    model, cfg = _model(seed=2)
    load_init(model, src, cfg)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.backbone.eval()(x), full.eval().forward_head(full.forward_features(x), pre_logits=True))
