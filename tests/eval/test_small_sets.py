"""A small labelled set, as a new user brings one (issue: ~120 labelled photos in class folders, a
takedowns.txt beside them, one corrupt file): eval says what such a set can and cannot tell."""

from __future__ import annotations

import json

import numpy as np

from openseer.commands import main
from openseer.eval.lowshot import lowshot_splits
from openseer.eval.report import Report, render_markdown
from openseer.eval.runner import knn_ks
from openseer.use.select import what_labels_tell

from .conftest import write_class_folders

CORRUPT = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2 + b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _labelled_folder(root):
    """4 classes of 30 PNGs, a takedowns.txt naming one of them, and a corrupt file: 121 files."""
    write_class_folders(root, {"boot": 30, "coat": 30, "shirt": 30, "bag": 30})
    (root / "takedowns.txt").write_text("coat/004.png\t2026-01-01T00:00:00Z\tasked by the subject\n")
    (root / "bag" / "scan_0099.png").write_bytes(CORRUPT)
    return root


def test_a_small_labelled_folder_is_evaluated_honestly(tmp_path, capsys):
    lab = _labelled_folder(tmp_path / "photos")
    out = tmp_path / "o" / "eval.json"
    code = main(["eval", "--backbone", "regnetx_002", "--random-init", "--data", str(lab), "--out", str(out),
                 "--protocols", "knn,linear,lowshot,baselines,fewlabels", "--lowshot-protocols", "knn,linear",
                 "--no-cache", "--threads", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    doc = json.loads(out.read_text())
    d = doc["data"]
    # the deny-listed file and the corrupt one: skipped by default and counted by their true reason
    assert d["skipped"] == {"corrupt": 1, "denied": 1}
    assert "skipped" in captured.err and "denied 1" in captured.err and "corrupt 1" in captured.err
    assert "could not be decoded" not in captured.err
    assert d["n_train"] + d["n_test"] == 119 and d["n_test"] < 30
    n_train = d["n_train"]
    # k >= the training images: skipped with the reason, never reported (k=100 and 200 would tie)
    assert all(r["k"] < n_train for r in doc["results"] if r["protocol"] == "knn")
    assert {r["k"] for r in doc["results"] if r["protocol"] == "knn" and r["split"] == "full"} == {10, 20}
    big = [s for s in doc["skipped"] if s["what"] == "kNN k=100,200 on all labels"]
    assert big and f"k >= the {n_train} labelled images" in big[0]["reason"]
    # 1% of ~24 images a class is under one image: that split is named for what it is, 1 image per class
    assert "1pct" not in doc["lowshot_splits"] and doc["lowshot_splits"]["1perclass"]["n"] == 4
    assert {r["split"] for r in doc["results"]} == {"full", "1perclass", "10pct"}
    # on 4 labelled images no given k fits: kNN on that split is skipped with the reason
    assert any(s["what"] == "kNN k=10,20,100,200 on the 1perclass split" and "pass a smaller --k" in s["reason"]
               for s in doc["skipped"])
    # every accuracy carries the test size and its Wilson interval; chance is the most common test class
    chance = d["chance_top1"]
    assert 25 <= chance < 50  # 4 balanced classes (one lost an image)
    for r in doc["results"]:
        assert r["n_test"] == d["n_test"]
        lo, hi = r["top1_ci95"]
        assert lo <= r["top1"] <= hi and hi - lo > 15  # ~24 test images: intervals of 15+ points
        assert r["at_or_below_chance"] == (r["top1"] <= chance)
    md = (out.parent / "eval.md").read_text()
    assert f"{d['n_test']} test" in md and f"the test split holds {d['n_test']} images" in md
    assert "[" in md.split("| 100% |")[1].splitlines()[0]  # the interval is in the table cells
    assert "skipped kNN k=100,200 on all labels" in md and "| 1/class |" in md
    assert not any("smallest class" in n for n in doc["notes"])  # k=10 and 20 are under ~23 images a class
    # 100 labels to choose from fewer than 100 training images: the budget rows say why they are not there
    assert not [r for r in doc["results"] if r["protocol"] == "fewlabels"]
    assert {"what": "the 100-label rows", "reason": f"100 labels need more than the {n_train} training images "
            "to choose from; pass a smaller --label-budget"} in doc["skipped"]


def test_below_chance_results_are_flagged():
    rep = Report({"data": {"name": "x", "n_train": 96, "n_test": 29, "n_classes": 4}})
    rep.chance = 27.6
    rep.add("this", "linear", "full", 20.7, 60.0, n_train=96, n_test=29)
    rep.add("this", "knn", "full", 62.1, 90.0, n_train=96, n_test=29, k=10)
    low, fine = rep.results
    assert low["at_or_below_chance"] and not fine["at_or_below_chance"]
    assert low["top1_ci95"][0] < 20.7 < low["top1_ci95"][1]
    md = render_markdown(rep.to_dict())
    assert "| linear probe | 100% | 20.7 [10-38] <=chance |" in md
    assert "| kNN k=10 | 100% | 62.1 [44-77] |" in md
    assert "<=chance: 1 result(s) at or below the 27.6%" in md
    # a large test split keeps plain numbers (its interval stays in the JSON)
    big = Report({"data": {"n_test": 10000}})
    big.chance = 10.0
    big.add("this", "linear", "full", 75.0, 95.0, n_test=10000)
    assert "| linear probe | 100% | 75.0 |" in render_markdown(big.to_dict())


def test_lowshot_splits_are_named_by_what_they_hold_and_skipped_when_they_do_not_fit():
    import torch

    from openseer.eval.common import Labelled

    labels = np.repeat(np.arange(4), 24)
    train = Labelled.from_tensors(torch.zeros(len(labels), 1, 4, 4, dtype=torch.uint8), labels,
                                  [f"k{i}" for i in range(len(labels))])
    skipped: dict[str, str] = {}
    splits = lowshot_splits(train, list("abcd"), 0, percents=(1, 3, 10, 100), skipped=skipped)
    assert list(splits) == ["1perclass", "10pct"]
    assert np.bincount(labels[splits["10pct"]["indices"]]).tolist() == [2, 2, 2, 2]
    assert skipped == {"3pct": "3% of each class gives the same 4 images as the 1perclass split",
                       "100pct": "100% of each class is every training image (96): the 100% rows already say it"}
    assert knn_ks((10, 20, 100, 200), 96, "full") == (10, 20)
    assert knn_ks((10, 20, 100, 200), 40, "10pct") == (20,) and knn_ks((5, 20), 10, "1pct") == (5,)
    assert knn_ks((10, 20), 4, "1perclass") == ()
    rep = Report({})
    assert knn_ks((5, 10, 20, 100), 60, "full", rep, smallest=8) == (5, 10, 20)
    assert rep.skipped == [{"what": "kNN k=100 on all labels", "reason": "k >= the 60 labelled images: every "
                            "image votes, so each such k gives the same answer"}]
    assert rep.notes == ["kNN k=10,20 is more than the 8 labelled images of the smallest class: its votes lean "
                         "towards the larger classes"]


def test_select_says_what_a_few_labels_can_tell():
    few, many = what_labels_tell(20), what_labels_tell(400)
    assert "20 labels measure a classifier only roughly" in few[0] and "58-92%" in few[0]
    assert "a rare class may get no label at all" in few[1]
    assert len(many) == 1 and "76-84%" in many[0]
    assert what_labels_tell(0) == []


def test_the_parser_repeats_the_label_budget_defaults():
    from openseer.commands import evaluate
    from openseer.eval import labelbudget, runner

    assert evaluate.LABEL_DRAWS == labelbudget.DRAWS == runner.EvalOptions().label_draws
    assert "fewlabels" in evaluate.PROTOCOLS


def test_labels_chosen_by_select_cover_what_random_labels_miss():
    """Ten separated clusters and a budget of 10: select's rule takes one image of each (every class
    labelled, every test image right); 10 random labels miss classes. Raw-pixel-like rows: random only."""
    from openseer.eval.labelbudget import budget_rows

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 16)) * 6
    sizes = np.array([60, 50, 45, 40, 35, 30, 25, 20, 15, 10]) * 2  # imbalanced: random picks favour big ones
    ytr = np.repeat(np.arange(10), sizes)
    xtr = (centres[ytr] + rng.normal(size=(len(ytr), 16))).astype(np.float32)
    yte = np.repeat(np.arange(10), 20)
    xte = (centres[yte] + rng.normal(size=(len(yte), 16))).astype(np.float32)
    rep = Report({})
    rep.chance = 10.0
    budget_rows(rep, "this", xtr, ytr, xte, yte, 10, 10, seed=0, draws=4)
    budget_rows(rep, "pixels", xtr, ytr, xte, yte, 10, 10, seed=0, draws=4, select=False)
    got = {(r["model"], r["split"]): r for r in rep.results}
    assert sorted(got) == [("pixels", "random10"), ("this", "random10"), ("this", "select10")]
    sel, rnd = got["this", "select10"], got["this", "random10"]
    assert sel["classes_labelled"] == 10 and sel["top1"] == 100.0 and sel["n_train"] == 10
    assert min(rnd["classes_labelled"]) < 10 and rnd["top1"] < sel["top1"] and rnd["top1_std"] >= 0
    assert len(rnd["top1_draws"]) == 4 and sum(rnd["protocols_chosen"].values()) == 4
    assert rnd["top1_ci95"][0] <= rnd["top1"] <= rnd["top1_ci95"][1]
    md = render_markdown(rep.to_dict())
    assert "| finetune's choice | 10 chosen by select | 100.0 [98-100] |  |" in md
    assert f"| finetune's choice | 10 random | {rnd['top1']:.1f} ±{rnd['top1_std']:.1f} [" in md
