"""Bad inputs give one clear message (exit status 2, no traceback)."""

from __future__ import annotations

import json

import pytest

from openseer.commands import main
from openseer.eval.common import EvalError, open_labelled

from .conftest import make_run, write_class_folders


def _run(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def test_unlabelled_folder(tmp_path, capsys):
    write_class_folders(tmp_path / "x", {"a": 3})
    for p in (tmp_path / "x" / "a").iterdir():
        p.rename(tmp_path / "x" / p.name)
    (tmp_path / "x" / "a").rmdir()
    code, err = _run(["eval", "--backbone", "regnetx_002", "--random-init", "--data", str(tmp_path / "x")], capsys)
    assert code == 2
    assert "is not labelled: it has 3 images directly in it but no class subfolders" in err
    assert "Traceback" not in err


def test_class_too_small_for_a_split(tmp_path, capsys):
    write_class_folders(tmp_path / "lab", {"a": 20, "b": 20, "c": 1})
    with pytest.raises(EvalError, match="at least 2 images per class; too few in: 'c' \\(1\\)"):
        open_labelled(str(tmp_path / "lab"))
    write_class_folders(tmp_path / "lab2", {"a": 20, "b": 6})
    code, err = _run(["eval", "--backbone", "regnetx_002", "--random-init", "--data", str(tmp_path / "lab2"),
                      "--out", str(tmp_path / "o" / "eval.json"), "--per-class", "8", "--protocols", "lowshot",
                      "--no-cache", "--quiet"], capsys)
    assert code == 2
    assert "the 8-per-class split needs 8 images per class, but class 'b' has only 5" in err


def test_checkpoint_whose_backbone_does_not_match(tmp_path, capsys):
    make_run(tmp_path / "run")
    code, err = _run(["eval", str(tmp_path / "run"), "--backbone", "regnety_004", "--data", "fashion-mnist"], capsys)
    assert code == 2
    assert "holds a regnety_002 backbone but --backbone regnety_004 was given" in err


def test_csv_with_missing_files(tmp_path, capsys):
    write_class_folders(tmp_path / "img", {"a": 6, "b": 6})
    rows = ["path,label"] + [f"img/{c}/{i:03d}.png,{c}" for c in "ab" for i in range(6)]
    rows += ["img/a/gone1.png,a", "img/b/gone2.png,b"]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    code, err = _run(["eval", "--backbone", "regnetx_002", "--random-init", "--data", str(tmp_path / "labels.csv"),
                      "--out", str(tmp_path / "o" / "eval.json"), "--protocols", "knn", "--no-cache", "--quiet"],
                     capsys)
    assert code == 2
    assert "2 of 14 files listed in" in err and "gone1.png" in err and "gone2.png" in err
    assert "--skip-missing" in err
    code, err = _run(["eval", "--backbone", "regnetx_002", "--random-init", "--data", str(tmp_path / "labels.csv"),
                      "--out", str(tmp_path / "o" / "eval.json"), "--protocols", "knn", "--no-cache", "--quiet",
                      "--skip-missing", "--k", "3"], capsys)
    assert code == 0
    assert "skipping 2 of 14 files" in err
    doc = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert doc["data"]["n_train"] + doc["data"]["n_test"] == 12
    assert any("skipped 2 missing files" in n for n in doc["data"]["notes"])


def test_undecodable_image_in_a_class_folder(tmp_path, capsys):
    """A bad file is skipped and counted by its reason by default (as every pile reader does);
    --skip-missing changes nothing for it."""
    write_class_folders(tmp_path / "lab", {"a": 5, "b": 5})
    (tmp_path / "lab" / "a" / "broken.png").write_bytes(b"<html>not a png</html>")
    argv = ["eval", "--backbone", "regnetx_002", "--random-init", "--data", str(tmp_path / "lab"), "--out",
            str(tmp_path / "o" / "eval.json"), "--protocols", "knn", "--no-cache", "--quiet", "--k", "3",
            "--test-fraction", "0.4"]
    for extra in ([], ["--skip-missing"]):
        code, err = _run([*argv, *extra], capsys)
        assert code == 0 and "skipped 1" in err and "not_an_image 1" in err and "broken.png" in err
        doc = json.loads((tmp_path / "o" / "eval.json").read_text())
        assert doc["data"]["skipped"] == {"not_an_image": 1}
        assert doc["data"]["n_train"] + doc["data"]["n_test"] == 10
