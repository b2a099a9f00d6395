"""import-seer: VISSL (SEER's released layout) and timm files -> an openseer backbone, and back.

No official weights can be downloaded here, so the VISSL files are generated: a timm RegNet's
weights written in VISSL's nested layout with VISSL's key names (the names timm's own SEER loader
expects, checked below), plus a SwAV head like SEER's.
"""

from __future__ import annotations

import re

import pytest
import timm
import torch

import openseer
from openseer.commands import main
from openseer.use.vissl import WeightsImportError, import_weights, timm_key_to_vissl, to_vissl


def _timm(arch="regnety_002", seed=0):
    torch.manual_seed(seed)
    return timm.create_model(arch, num_classes=0, zero_init_last=False).eval()


def _vissl_file(path, net, fsdp=False):
    """What SEER released: classy_state_dict.base_model.model.{trunk, heads}; ``fsdp``: the 10B
    trunk's layout (block groups and FSDP wrapper names)."""
    trunk = {}
    for k, v in net.state_dict().items():
        vk = timm_key_to_vissl(k)
        if fsdp:
            vk = re.sub(r"(res\d+)\.(block(\d+))-(\d+)", r"\1.block\3-part0._fsdp_wrapped_module.\2-\4", vk)
        trunk[vk] = v.clone()
    heads = {"0.projection_head.0.weight": torch.randn(16, 368), "0.prototypes0.weight": torch.randn(30, 16)}
    torch.save({"classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": heads}}},
                "iteration": 244000, "type": "checkpoint"}, path)
    return path


def test_vissl_layout_is_what_timms_seer_loader_reads(tmp_path):
    from timm.models.regnet import _filter_fn  # timm's converter for the released SEER files

    net = _timm()
    keys = set(to_vissl(net.state_dict())["classy_state_dict"]["base_model"]["model"]["trunk"])
    assert "_feature_blocks.conv1.stem.0.weight" in keys
    assert "_feature_blocks.res2.block1-0.proj.weight" in keys
    assert "_feature_blocks.res3.block2-0.f.se.excitation.0.bias" in keys
    converted = _filter_fn(torch.load(_vissl_file(tmp_path / "s.torch", net), weights_only=True))
    assert set(converted) == set(net.state_dict())


@pytest.mark.parametrize("fsdp", [False, True])
def test_vissl_file_imports_and_gives_the_same_outputs(tmp_path, capsys, fsdp):
    net = _timm()
    src = _vissl_file(tmp_path / "seer_regnet_model.torch", net, fsdp=fsdp)
    out = tmp_path / "rg.safetensors"
    assert main(["import-seer", str(src), "--arch", "regnety_002", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "vissl layout" in printed and "dropped 2 non-backbone tensors" in printed
    model = openseer.load(out)
    assert model.arch == "regnety_002" and model.info["crop_size"] == 224
    assert model.info["mean"] == pytest.approx([0.485, 0.456, 0.406])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.backbone(x), net(x))


def test_wrong_architecture_names_the_first_mismatched_key_and_shapes(tmp_path, capsys):
    src = _vissl_file(tmp_path / "s.torch", _timm("regnety_002"))
    assert main(["import-seer", str(src), "--arch", "regnety_004", "--out", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "does not match --arch regnety_004" in err
    assert "first mismatched key s1.b1.conv1.conv.weight (file key _feature_blocks.res2.block1-0.f.a.0.weight)" in err
    assert "file (24, 32, 1, 1), expected (48, 32, 1, 1)" in err
    assert "the file matches regnety_002" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_missing_and_unknown_keys_fail_clearly(tmp_path):
    sd = to_vissl(_timm().state_dict())
    trunk = sd["classy_state_dict"]["base_model"]["model"]["trunk"]
    del trunk["_feature_blocks.res5.block4-0.f.c.weight"]
    torch.save(sd, tmp_path / "cut.torch")
    with pytest.raises(WeightsImportError, match="first missing key s4.b1.conv3.conv.weight"):
        import_weights(tmp_path / "cut.torch", tmp_path / "o.safetensors", arch="regnety_002")
    trunk["_feature_blocks.res2.block1-0.f.zz.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "odd.torch")
    with pytest.raises(WeightsImportError, match="unknown VISSL RegNet trunk key _feature_blocks.res2.block1-0.f.zz"):
        import_weights(tmp_path / "odd.torch", tmp_path / "o.safetensors", arch="regnety_002")


def test_pickled_code_is_refused(tmp_path):
    torch.save({"classy_state_dict": {"x": WeightsImportError("not a tensor")}}, tmp_path / "evil.torch")
    with pytest.raises(WeightsImportError, match="refused to load"):
        import_weights(tmp_path / "evil.torch", tmp_path / "o.safetensors")


def test_timm_state_dict_imports_with_guessed_arch_and_exports_back_to_vissl(tmp_path, capsys):
    torch.manual_seed(1)
    full = timm.create_model("regnety_002", num_classes=10, zero_init_last=False).eval()
    torch.save(full.state_dict(), tmp_path / "timm.pth")
    out = tmp_path / "imported.safetensors"
    assert main(["import-seer", str(tmp_path / "timm.pth"), "--out", str(out)]) == 0  # arch guessed
    printed = capsys.readouterr().out
    assert "timm layout" in printed and "regnety_002" in printed and "(e.g. head.fc.weight)" in printed
    model = openseer.load(out)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(model.backbone(x), full.forward_head(full.forward_features(x), pre_logits=True))
    # and back: timm -> VISSL layout, which imports again to the same weights
    back = tmp_path / "back.torch"
    assert main(["export", str(out), "--format", "vissl", "--out", str(back)]) == 0
    sd = torch.load(back, weights_only=True)
    trunk = sd["classy_state_dict"]["base_model"]["model"]["trunk"]
    assert "_feature_blocks.conv1.stem.1.running_var" in trunk
    again = import_weights(back, tmp_path / "again.safetensors")
    assert again["arch"] == "regnety_002" and again["layout"] == "vissl"
    with torch.no_grad():
        assert torch.equal(openseer.load(tmp_path / "again.safetensors").backbone(x), model.backbone(x))
