"""Test-set leakage audit: ``openseer eval RUN --leakage`` finds the evaluation images that have a copy
in the run's pretraining pile (re-encoded, resized, mirrored), lists them, and ``--leakage exclude``
leaves the leaked test images out of the numbers."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from openseer.commands import main
from openseer.data.collection import load_fashion_mnist
from openseer.eval.common import Labelled, LabelledData
from openseer.eval.leakage import audit
from tests.conftest import fmnist_available
from tests.data.test_nearcopy import photo
from tests.use.kit import make_run

SIZE = (96, 72)


def _jpeg(img: Image.Image, q: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> dict:
    """A labelled folder (train/ and val/, two classes), a pile holding copies of three of its images
    among unrelated photos, and a run whose data.source is that pile."""
    root = tmp_path_factory.mktemp("leak")
    labelled, pile = root / "labelled", root / "pile"
    imgs = {}
    seed = 0
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (labelled / split / cls).mkdir(parents=True)
            for i in range(3):
                img = photo(seed, SIZE)
                seed += 1
                path = labelled / split / cls / f"{i}.png"
                img.save(path)
                imgs[f"{split}/{cls}/{i}"] = (path, img)
    pile.mkdir()
    seeds = {  # eval image -> its copy in the pile
        "val/a/0": ("reencoded.jpg", lambda im: _jpeg(im, 40)),
        "val/b/1": ("resized.png", lambda im: im.resize((SIZE[0] // 2, SIZE[1] // 2), Image.Resampling.BILINEAR)),
        "train/a/2": ("flipped.png", lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
    }
    for name, (fname, copy) in seeds.items():
        copy(imgs[name][1]).save(pile / fname)
    for j in range(8):  # unrelated images of the same kind
        photo(1000 + j, SIZE).save(pile / f"other{j}.png")
    run = make_run(root / "run", overrides=(f"data.source={pile}",))
    return {"labelled": labelled, "pile": pile, "run": run, "imgs": imgs, "seeds": seeds}


def _eval(seeded: dict, out: Path, *extra: str) -> dict:
    rc = main(["eval", str(seeded["run"]), "--data", str(seeded["labelled"]), "--protocols", "knn", "--k", "3",
               "--no-cache", "--quiet", "--device", "cpu", "--out", str(out), *extra])
    assert rc == 0
    return json.loads(out.read_text())


def test_the_audit_finds_exactly_the_seeded_copies_and_exclude_drops_them(seeded, tmp_path):
    doc = _eval(seeded, tmp_path / "a" / "eval.json", "--leakage")
    leak = doc["leakage"]
    assert (leak["test_in_pile"], leak["train_in_pile"], leak["test_excluded"]) == (2, 1, 0)
    assert leak["method"].startswith("near copies, from the pile's index")
    assert (seeded["pile"] / ".openseer-index").is_dir()  # built for the audit
    rows = list(csv.DictReader(open(tmp_path / "a" / "eval-leakage.csv")))
    found = {(Path(r["eval_image"]).relative_to(seeded["labelled"]).with_suffix("").as_posix(),
              Path(r["pile_path"]).name) for r in rows}
    assert found == {(name, fname) for name, (fname, _) in seeded["seeds"].items()}
    assert all(float(r["similarity"]) >= 0.8 and r["excluded"] == "False" for r in rows)
    assert doc["data"]["n_test"] == 6 and all(r["n_test"] == 6 for r in doc["results"])
    md = (tmp_path / "a" / "eval.md").read_text()
    assert "2 of 6 test images" in md and "not excluded" in md

    doc = _eval(seeded, tmp_path / "b" / "eval.json", "--leakage", "exclude")
    leak = doc["leakage"]
    assert (leak["test_in_pile"], leak["test_excluded"]) == (2, 2)
    assert doc["data"]["n_test"] == 4 and doc["results"] and all(r["n_test"] == 4 for r in doc["results"])
    assert "left out of the test split (4 test images remain)" in (tmp_path / "b" / "eval.md").read_text()
    rows = list(csv.DictReader(open(tmp_path / "b" / "eval-leakage.csv")))
    assert {r["split"]: r["excluded"] for r in rows} == {"test": "True", "train": "False"}


def test_a_pile_that_is_not_here_is_named(seeded, tmp_path, capsys):
    rc = main(["eval", str(seeded["run"]), "--data", str(seeded["labelled"]), "--protocols", "knn", "--quiet",
               "--no-cache", "--out", str(tmp_path / "eval.json"), "--leakage", "--pile", str(tmp_path / "gone")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "gone does not exist" in err and "--pile" in err and "Traceback" not in err
    assert main(["eval", str(seeded["run"]), "--pile", str(seeded["pile"])]) == 2
    assert "give it with --leakage" in capsys.readouterr().err


@fmnist_available
def test_an_in_memory_pile_is_compared_by_exact_pixels(tmp_path):
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    train = Labelled.from_tensors(x[[5, 17]], y[[5, 17]].numpy(), ["t5", "t17"])
    test = Labelled.from_tensors(xt[[0, 1, 2]], yt[[0, 1, 2]].numpy(), ["e0", "e1", "e2"])
    test_images = test.images.clone()
    test_images[1] = x[42]  # a pile image in the test split
    test = Labelled.from_tensors(test_images, test.labels, test.keys)
    data = LabelledData("mixed", train, test, [str(i) for i in range(10)], "given")
    leak = audit(data, "fashion-mnist", "exclude", tmp_path / "leak.csv")
    assert leak.method.startswith("exact pixels")
    assert leak.leaked == {"train": [0, 1], "test": [1]}
    assert {r["pile_key"] for r in leak.rows} >= {"fashion-mnist:train:5", "fashion-mnist:train:17",
                                                  "fashion-mnist:train:42"}
    assert len(data.test) == 2 and np.array_equal(data.test.labels, test.labels[[0, 2]])


def test_a_file_added_to_the_pile_after_it_was_indexed_is_searched(seeded, tmp_path, capsys):
    import shutil

    from openseer.eval.common import open_labelled

    pile = tmp_path / "pile"
    shutil.copytree(seeded["pile"], pile)  # its index too, as the first audit built it
    data = open_labelled(str(seeded["labelled"]))
    assert len(audit(data, str(pile), "report", tmp_path / "one.csv").leaked["test"]) == 2
    _jpeg(seeded["imgs"]["val/b/2"][1], 60).save(pile / "added.jpg")  # the index no longer matches the pile
    data = open_labelled(str(seeded["labelled"]))
    leak = audit(data, str(pile), "exclude", tmp_path / "two.csv")
    assert "indexing the pretraining pile" in capsys.readouterr().err
    assert {Path(r["pile_path"]).name for r in leak.rows if r["split"] == "test"} == {
        "reencoded.jpg", "resized.png", "added.jpg"}
    assert len(data.test) == 3 and "left out 3 test images" in data.notes[-1]


def test_in_memory_eval_images_are_searched_in_a_file_pile(seeded, tmp_path):
    import torch

    names = ["train/a/2", "train/b/0", "val/a/0", "val/b/0"]
    x = torch.stack([torch.from_numpy(np.array(seeded["imgs"][n][1])).permute(2, 0, 1) for n in names])
    data = LabelledData("tensors", Labelled.from_tensors(x[:2], np.array([0, 1]), names[:2]),
                        Labelled.from_tensors(x[2:], np.array([0, 1]), names[2:]), ["a", "b"], "given")
    leak = audit(data, str(seeded["pile"]), "report", tmp_path / "leak.csv")
    assert leak.leaked == {"train": [0], "test": [0]} and len(data.test) == 2
    assert [(r["eval_image"], Path(r["pile_path"]).name) for r in leak.rows] == [
        ("train/a/2", "flipped.png"), ("val/a/0", "reencoded.jpg")]


def test_weights_without_a_run_config_need_the_pile_named(seeded, tmp_path, capsys):
    rc = main(["eval", "--backbone", "regnety_002", "--random-init", "--data", str(seeded["labelled"]),
               "--protocols", "knn", "--quiet", "--no-cache", "--out", str(tmp_path / "eval.json"), "--leakage"])
    assert rc == 2 and "give it with --pile PILE" in capsys.readouterr().err
