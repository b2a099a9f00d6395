"""load_backbone: run dir, checkpoint, exported safetensors / state dict, timm name; mismatches."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from openseer.model.backbone import BackboneError
from openseer.model.load import load_backbone
from openseer.train.checkpoint import CheckpointError
from openseer.use.export import export_backbone


def test_every_kind_of_weights_gives_the_same_backbone(tiny_run, tmp_path):
    model, info = load_backbone(str(tiny_run))
    assert info["kind"] == "run" and info["arch"] == "regnety_002" and info["step"] == 3
    assert info["crop_size"] == 24 and info["mean"] == pytest.approx([0.286] * 3)
    ckpt = next((tiny_run / "checkpoints").iterdir())
    _, info_ckpt = load_backbone(str(ckpt))
    assert info_ckpt["weights_hash"] == info["weights_hash"]
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp_path / "b.safetensors"), metadata={"arch": "regnety_002"})
    _, info_st = load_backbone(str(tmp_path / "b.safetensors"))
    assert info_st["weights_hash"] == info["weights_hash"] and info_st["kind"] == "safetensors"
    exported = export_backbone(tiny_run, tmp_path / "exported.safetensors")
    _, info_ex = load_backbone(str(exported))
    assert info_ex["weights_hash"] == info["weights_hash"] and info_ex["step"] == 3 and info_ex["crop_size"] == 24
    torch.save(sd, tmp_path / "b.pt")
    _, info_pt = load_backbone(str(tmp_path / "b.pt"), arch="regnety_002")
    assert info_pt["weights_hash"] == info["weights_hash"] and info_pt["kind"] == "state_dict"


def test_random_init_is_seeded_and_not_constant():
    m1, i1 = load_backbone("regnetx_002", random_init=True, seed=0)
    _, i2 = load_backbone(None, arch="regnetx_002", random_init=True, seed=0)
    _, i3 = load_backbone(None, arch="regnetx_002", random_init=True, seed=1)
    assert i1["weights_hash"] == i2["weights_hash"] != i3["weights_hash"]
    assert i1["crop_size"] == 24  # the tiny-cpu recipe trains regnetx_002
    with torch.inference_mode():
        f = m1(torch.randn(8, 3, 24, 24))
    assert float(f.std(0).mean()) > 1e-3


def test_mismatched_backbones_are_clear_errors(tiny_run, tmp_path):
    with pytest.raises(BackboneError, match="holds a regnety_002 backbone but --backbone regnety_004"):
        load_backbone(str(tiny_run), arch="regnety_004")
    model, _ = load_backbone(str(tiny_run))
    torch.save(model.state_dict(), tmp_path / "b.pt")
    with pytest.raises(BackboneError, match="do not match backbone regnety_004.*--backbone"):
        load_backbone(str(tmp_path / "b.pt"), arch="regnety_004")
    with pytest.raises(BackboneError, match="does not say which architecture"):
        load_backbone(str(tmp_path / "b.pt"))
    with pytest.raises(BackboneError, match="not a run directory, a checkpoint"):
        load_backbone("no_such_thing_42")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a run directory"):
        load_backbone(str(tmp_path / "empty"))
