"""``--layer``: which stages the frozen-feature protocols read."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from openseer.commands import main
from openseer.eval.common import EvalError
from openseer.eval.layers import PooledStages, describe_layer, parse_layer, stage_names
from openseer.model.backbone import build_backbone

from .conftest import write_class_folders


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_backbone("regnetx_002", zero_init_last=False).eval()


def test_stage_names_and_parsing(net):
    assert stage_names(net) == ["stem", "s1", "s2", "s3", "s4"]
    assert parse_layer("last", net) == () and parse_layer("", net) == ()
    assert parse_layer("s3+s4", net) == ("s3", "s4")
    assert parse_layer(" s2 ", net) == ("s2",)
    with pytest.raises(EvalError, match=r"unknown stage 'layer3'.*stem, s1, s2, s3, s4"):
        parse_layer("layer3", net, "regnetx_002")
    for bad, why in (("s3+s3", "a stage named twice"), ("s3+", "an empty stage name"), ("+s4", "an empty stage")):
        with pytest.raises(EvalError, match=why):
            parse_layer(bad, net)
    assert "last stage" in describe_layer(()) and "L2-normalised" in describe_layer(("s3", "s4"))


def test_pooled_stages_known_values(net):
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        s3 = net.s3(net.s2(net.s1(net.stem(x))))  # the stages by hand
        s4 = net.s4(s3)
        last = net(x)  # timm's own pooled features (num_classes=0)
        one = PooledStages(net, ("s4",))(x)
        both = PooledStages(net, ("s3", "s4"))(x)
    torch.testing.assert_close(one, last)
    torch.testing.assert_close(one, s4.mean((2, 3)))
    want = torch.cat([F.normalize(s3.mean((2, 3)), dim=1), F.normalize(s4.mean((2, 3)), dim=1)], 1)
    torch.testing.assert_close(both, want)
    assert both.shape == (3, s3.shape[1] + s4.shape[1])
    assert all(not m._forward_hooks for m in net.modules())  # nothing left behind for the fine-tunes


def test_eval_with_two_stages_records_the_layer(tiny_run, tmp_path, capsys):
    data = write_class_folders(tmp_path / "data", {"a": 20, "b": 20, "c": 20})
    cache = str(tmp_path / "cache")
    outs = {}
    for layer in ("last", "s3+s4"):
        out = tmp_path / layer / "eval.json"
        assert main(["eval", str(tiny_run), "--data", str(data), "--out", str(out), "--protocols", "knn,linear",
                     "--k", "5", "--layer", layer, "--cache-dir", cache, "--quiet", "--threads", "1"]) == 0
        outs[layer] = json.loads(out.read_text())
    two = outs["s3+s4"]
    assert "s3+s4" in two["feature_layer"] and two["options"]["layer"] == "s3+s4"
    assert {r["feature_layer"] for r in two["results"]} == {"pooled s3+s4"}
    assert {r["feature_layer"] for r in outs["last"]["results"]} == {"pooled last"}
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 4  # train + test for each layer: separate entries
    capsys.readouterr()
    assert main(["eval", str(tiny_run), "--data", str(data), "--protocols", "knn", "--layer", "res5",
                 "--out", str(tmp_path / "bad" / "eval.json"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--layer 'res5': unknown stage 'res5'; regnety_002 has stages stem, s1, s2, s3, s4" in err
    assert "Traceback" not in err
