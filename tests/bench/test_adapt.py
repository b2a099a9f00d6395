"""The adapt recipes (settings for `pretrain --init`) and bench/adapt.py: its piles and a smoke run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from openseer.commands import main
from openseer.config import build_config, recipe_names, recipe_values
from openseer.train.loop import schedule
from openseer.train.preflight import advice
from tests.conftest import fmnist_available

ROOT = Path(__file__).resolve().parents[2]
ADAPT = {"tiny-cpu-adapt": "tiny-cpu", "photos-cpu-adapt": "photos-cpu", "seer-gpu-adapt": "seer-gpu"}


def _bench():
    spec = importlib.util.spec_from_file_location("adapt_bench", ROOT / "bench" / "adapt.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_each_adapt_recipe_is_its_scratch_recipe_with_gentler_optimisation_only():
    """Same data, crops, model and prototypes as the recipe it adapts (so a run of that recipe loads
    whole into it); a peak LR no higher, a shorter warm-up and prototype freezing no longer."""
    for name, base in ADAPT.items():
        assert name in recipe_names()
        cfg, ref = build_config(name), build_config(base)
        cfg.validate()
        for section in ("data", "crops", "model"):
            assert getattr(cfg, section) == getattr(ref, section), (name, section)
        assert cfg.swav.n_prototypes == ref.swav.n_prototypes and cfg.swav.queue_length == ref.swav.queue_length
        assert cfg.optim.base_lr <= ref.optim.base_lr, name
        assert cfg.optim.warmup_steps < ref.optim.warmup_steps, name
        assert cfg.swav.freeze_prototypes_steps <= ref.swav.freeze_prototypes_steps, name
        changed = {(s, k) for s, vals in recipe_values(name).items() if isinstance(vals, dict)
                   for k, v in vals.items() if getattr(getattr(ref, s), k) != v}
        assert changed and {s for s, _ in changed} <= {"optim", "swav"}, (name, changed)
        # the header cites the sweep, and each setting that differs says why with a measured number
        text = (ROOT / "openseer" / "recipes" / f"{name}.yaml").read_text()
        assert "docs/benchmarks.md" in text and "bench/adapt.py --sweep" in text, name
        lines = {line.split(":")[0].strip(): line for line in text.splitlines() if line.startswith("  ")}
        for _, key in changed:
            assert "#" in lines[key] and any(ch.isdigit() for ch in lines[key].split("#", 1)[1]), (name, key)


def test_openseer_recipes_lists_the_adapt_recipes(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ADAPT:
        assert any(line.startswith(name + " ") for line in out.splitlines()), name


def test_the_photos_warnings_apply_to_the_adapt_recipes():
    """A run too short for the recipe's warm-up, and photos far larger than tiny-cpu-adapt's crops,
    are told as for the scratch recipes."""
    cfg = build_config("photos-cpu-adapt", ["optim.minutes=0"])
    sched = schedule(cfg, 640, 1)
    short = advice(cfg, sched, 0, max(cfg.optim.warmup_steps, 1), None)
    assert any("optim.warmup_steps" in w and "outlasts" in w for w in short), short
    tiny = build_config("tiny-cpu-adapt", ["model.init=runs/a"])
    big = advice(tiny, schedule(tiny, 6400, 1), 0, 400, 1000)
    assert any("use a recipe for photographs" in w and "photos-cpu-adapt" in w for w in big), big


def test_large_photos_with_the_decode_cache_and_a_photos_recipe_are_a_note_not_a_warning():
    on = build_config("photos-cpu", ["data.decode_cache=on"])
    lines = [w for w in advice(on, schedule(on, 6400, 1), 0, 400, 3000) if "px on their short side" in w]
    assert len(lines) == 1 and lines[0].startswith("note:") and "the decode cache reads them" in lines[0]
    off = build_config("photos-cpu", ["data.decode_cache=off"])
    lines = [w for w in advice(off, schedule(off, 6400, 1), 0, 400, 3000) if "px on their short side" in w]
    assert len(lines) == 1 and lines[0].startswith("WARNING:") and "openseer shard" in lines[0]


def test_init_without_an_adapt_recipe_suggests_one_and_with_it_says_nothing():
    scratch = build_config("tiny-cpu", ["model.init=runs/a"])
    lines = advice(scratch, schedule(scratch, 6400, 1), 0, 400, None)
    assert [w for w in lines if "--recipe tiny-cpu-adapt" in w], lines
    adapt = build_config("tiny-cpu-adapt", ["model.init=runs/a"])
    assert not [w for w in advice(adapt, schedule(adapt, 6400, 1), 0, 400, None) if "-adapt" in w]
    plain = build_config("tiny-cpu")  # no --init: nothing to suggest
    assert not [w for w in advice(plain, schedule(plain, 6400, 1), 0, 400, None) if "-adapt" in w]


@fmnist_available
def test_the_piles_hold_only_their_classes_and_read_back_as_fashion_mnist(tmp_path):
    from openseer.data.collection import is_fashion_mnist, load_fashion_mnist

    bench = _bench()
    folder = bench.write_pile(tmp_path / "target", bench.TARGET_CLASSES)
    assert is_fashion_mnist(str(folder))
    full_x, full_y = load_fashion_mnist("test")
    x, y = load_fashion_mnist("test", folder)
    keep = np.isin(full_y.numpy(), bench.TARGET_CLASSES)
    assert set(np.unique(y.numpy())) == set(bench.TARGET_CLASSES) and len(y) == int(keep.sum()) == 5000
    assert (x.numpy() == full_x.numpy()[keep]).all()  # the same pixels, in the same order
    xs, ys = load_fashion_mnist("train", bench.write_pile(tmp_path / "source", bench.SOURCE_CLASSES))
    assert set(np.unique(ys.numpy())) == set(bench.SOURCE_CLASSES) and len(ys) == 30000


@pytest.mark.heavy
@fmnist_available
def test_adapt_bench_quick_prints_one_json_line_with_all_three_models(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "adapt.py"), "--quick", "--minutes", "0.05",
                        "--source-minutes", "0.05", "--seeds", "1", "--threads", "1", "--work", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["bench"] == "adapt" and line["quick"] and line["seeds"] == 1
    for model in ("source", "adapted", "scratch"):
        for score in ("knn20", "linear", "knn20_10pct", "linear_10pct"):
            assert 20.0 <= line["summary"][model][score]["mean"] <= 100.0, (model, score)  # 5 classes: chance is 20
    assert set(line["gain_vs_scratch"]) >= {"knn20", "linear"} and set(line["gain_vs_source"]) >= {"knn20", "linear"}
    assert line["gain_vs_source"]["knn20"] == round(line["summary"]["adapted"]["knn20"]["mean"]
                                                    - line["summary"]["source"]["knn20"]["mean"], 2)
    init = json.loads((tmp_path / "adapted-0.05m-seed0" / "init.json").read_text())
    assert "prototypes" in init["loaded"] and "head" in init["loaded"]  # (b) started from the source's weights, prototypes included
    assert "tiny-cpu-adapt" in (tmp_path / "adapted-0.05m-seed0" / "config.yaml").read_text()
