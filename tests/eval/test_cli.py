"""``openseer eval`` end to end on a tiny checkpoint and a small part of Fashion-MNIST."""

from __future__ import annotations

import json

import pytest

from openseer.commands import main

from ..conftest import fmnist_available


@pytest.mark.heavy  # 50 s: every protocol and baseline at once; the demo smoke and the per-protocol tests cover the fast path
@fmnist_available
def test_eval_writes_every_protocol_and_baseline(tiny_run, tmp_path, capsys):
    out = tmp_path / "report" / "eval.json"
    argv = [
        "eval", str(tiny_run), "--data", "fashion-mnist", "--out", str(out), "--limit-train", "1000",
        "--limit-test", "200", "--finetune-epochs", "1", "--cache-dir", str(tmp_path / "cache"),
        "--k", "5,20", "--quiet", "--threads", "1", "--label-budget", "20", "--label-draws", "1",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| protocol | labels | this model | random init* | raw pixels | supervised from scratch |" in printed
    doc = json.loads(out.read_text())
    assert (out.parent / "eval.md").read_text().strip() in printed
    got = {(r["model"], r["protocol"], r["split"], r.get("k")) for r in doc["results"]}
    for model in ("this", "random_init", "pixels"):
        for split in ("full", "1pct", "10pct"):
            assert (model, "linear", split, None) in got
        for split in ("full", "10pct"):
            assert (model, "knn", split, 20) in got
        # the 1% split holds 10 images: k=20 would let every one vote, so its kNN keeps k=5
        assert (model, "knn", "1pct", 5) in got and (model, "knn", "1pct", 20) not in got
        assert (model, "knn", "full", 5) in got
    assert {"what": "kNN k=20 on the 1pct split", "reason": "k >= the 10 labelled images: every image votes, so "
            "each such k gives the same answer"} not in doc["skipped"]  # a smaller k ran instead
    for model in ("this", "scratch"):
        for split in ("1pct", "10pct"):
            assert (model, "finetune", split, None) in got
    assert {r["model"] for r in doc["results"] if r["protocol"] == "fewlabels"} >= {"this", "pixels"}
    for r in doc["results"]:
        assert 0 <= r["top1"] <= r["top5"] <= 100
        lo, hi = r["top1_ci95"]  # 200 test images: every accuracy carries its interval
        assert lo <= r["top1"] <= hi and r["n_test"] == 200 and "at_or_below_chance" in r
        assert "seed" in r and "feature_layer" in r and "weights_hash" in r
    assert doc["weights"]["weights_hash"] and doc["data"]["n_train"] == 1000 and doc["data"]["n_test"] == 200
    assert doc["transform"]["crop"] == 24
    knn = next(r for r in doc["results"] if r["protocol"] == "knn")
    assert knn["temperature"] == 0.07
    ft = next(r for r in doc["results"] if r["protocol"] == "finetune")
    assert ft["epochs"] == 1 and ft["lr_head"] > ft["lr_backbone"]
    assert "zero_init_last=False" in printed
    splits = sorted(p.name for p in out.parent.glob("lowshot-*.json"))
    assert splits == ["lowshot-10pct-seed0.json", "lowshot-1pct-seed0.json"]
    first = (out.parent / "lowshot-1pct-seed0.json").read_text()

    # a second run (other weights: the random floor) reuses nothing but gives identical split files
    out2 = tmp_path / "floor" / "eval.json"
    assert main(["eval", "--backbone", "regnetx_002", "--random-init", "--data", "fashion-mnist", "--out", str(out2),
                 "--limit-train", "1000", "--limit-test", "200", "--protocols", "knn,lowshot",
                 "--finetune-epochs", "1", "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 0
    assert (out2.parent / "lowshot-1pct-seed0.json").read_text() == first
    doc2 = json.loads(out2.read_text())
    assert {r["model"] for r in doc2["results"]} == {"this"}
    assert doc2["weights"]["random_init"] is True


@fmnist_available
def test_lowshot_protocols_choose_what_runs_on_the_subsets(tiny_run, tmp_path, capsys):
    out = tmp_path / "frozen" / "eval.json"
    assert main(["eval", str(tiny_run), "--data", "fashion-mnist", "--out", str(out), "--limit-train", "500",
                 "--limit-test", "200", "--protocols", "linear,lowshot,baselines", "--lowshot-protocols", "linear",
                 "--cache-dir", str(tmp_path / "cache"), "--quiet", "--threads", "1"]) == 0
    doc = json.loads(out.read_text())
    got = {(r["model"], r["protocol"], r["split"]) for r in doc["results"]}
    # the linear probe on every split for the model and both frozen baselines (which also get kNN on all
    # labels); no kNN on the subsets, no fine-tune and so no supervised-from-scratch baseline either
    # (1% of 50 images a class rounds to none: that split is 1 image per class, and named so)
    frozen = {(m, "linear", s) for m in ("this", "random_init", "pixels") for s in ("full", "1perclass", "10pct")}
    assert got == frozen | {("random_init", "knn", "full"), ("pixels", "knn", "full")}
    assert "1 image of each class (1% of each class rounds to less than 1 in 10 of 10 classes)" == \
        doc["lowshot_splits"]["1perclass"]["rule"]
    assert doc["options"]["lowshot_protocols"] == ["linear"]
    printed = capsys.readouterr().out
    assert "| protocol | labels | this model | random init* | raw pixels |\n" in printed
    assert "fine-tune" not in printed.lower()
    with pytest.raises(SystemExit) as bad:
        main(["eval", str(tiny_run), "--lowshot-protocols", "linear,finetuned", "--quiet"])
    assert bad.value.code == 2
    assert "unknown low-shot protocol(s) 'finetuned'" in capsys.readouterr().err
