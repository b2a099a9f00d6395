"""openseer report: one self-contained HTML page that renders in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from openseer.commands import main
from openseer.eval.report import Report
from openseer.use.run_report import write_report
from tests.conftest import fmnist_available
from tests.use.kit import image_folder, make_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0"]


def _eval_json(run: Path) -> None:
    rep = Report({"format": "openseer.eval.v1", "weights": {"arch": "regnety_002", "step": 3, "weights_hash": "ab"},
                  "data": {"name": "fashion-mnist", "split": "official", "n_train": 100, "n_test": 50,
                           "n_classes": 10}})
    rep.add("this", "knn", "full", 71.25, 95.0, k=20)
    rep.add("random_init", "knn", "full", 40.5, 80.0, k=20)
    rep.add("pixels", "linear", "full", 60.0, 90.0)
    rep.add("this", "linear", "full", 74.0, 96.0)
    rep.write(run / "eval.json")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    run = make_run(root / "run", metrics=12)
    _eval_json(run)
    images = image_folder(root / "imgs", n=40)
    r = write_report(run, data=str(images), sample=60, prototypes=4, per_prototype=5, queries=3, neighbours=4)
    return Path(r["path"]), r


def _img_srcs(text: str) -> list[str]:
    return re.findall(r"<img[^>]*\ssrc='([^']+)'", text)


def test_report_is_self_contained_with_every_section(report):
    path, r = report
    assert path.name == "report.html" and path.parent.name == "run"
    text = path.read_text()
    for title in ("Training curves", "Evaluation", "What the prototypes mean", "Nearest neighbours",
                  "Map of the embeddings"):
        assert f"<h2>{title}</h2>" in text
    assert "71.2" in text and "random init" in text and "raw pixels" in text  # the eval table + baselines
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # nothing fetched from the network
    srcs = _img_srcs(text)
    assert len(srcs) >= 1 + 1 + 3 + 1  # curves, >= 1 prototype row, 3 neighbour rows, the map
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        img.load()
        assert img.width > 10 and img.height > 10
    assert r["notes"] == []


def test_missing_pieces_become_notes_not_errors(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0, "lr": 0.1}\n{"step": 2, "loss": 4.9, "lr"\n')
    assert main(["report", str(run)]) == 0
    assert "report written" in capsys.readouterr().out
    text = (run / "report.html").read_text()
    assert "No eval.json" in text and "nothing to run" in text and len(_img_srcs(text)) == 1
    assert main(["report", str(tmp_path / "nope")]) == 2


@fmnist_available
def test_fashion_mnist_sample_of_2000_is_fast(tmp_path):
    run = make_run(tmp_path / "run", metrics=30)  # its config trains on fashion-mnist
    t0 = time.perf_counter()
    r = write_report(run, sample=2000)
    assert time.perf_counter() - t0 < 60
    text = Path(r["path"]).read_text()
    assert "2000 images drawn" in text and "coloured by label" in text and "most common label" in text


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    path, _ = report
    url = path.resolve().as_uri()
    profile = tmp_path / "profile"
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000",
                          "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    n_img = len(_img_srcs(path.read_text()))
    assert f'data-images="{n_img}"' in dom.stdout  # the page's load handler ran ...
    assert 'data-broken-images="0"' in dom.stdout  # ... and every image decoded
    shot = tmp_path / "shot.png"
    res = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}",
                          "--window-size=1200,2000", url], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    for log in (dom.stderr, res.stderr):
        assert "Uncaught" not in log and ":CONSOLE" not in log  # the page logs nothing at all
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (2000, 1200)
    assert pixels.std() > 20 and (pixels < 128).mean() > 0.01  # not blank: text, plots and images drawn


def _curve_pixels(html_text: str) -> list[int]:
    """Pixels of the curves' colour in each quadrant (panel) of the training-curves figure."""
    from openseer.use.run_report import CURVE

    src = re.search(r"alt='training curves' src='data:image/png;base64,([^']+)'", html_text).group(1)
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(src))).convert("RGB")).astype(int)
    rgb = np.array([int(CURVE[i:i + 2], 16) for i in (1, 3, 5)])
    hit = np.abs(img - rgb).sum(axis=2) < 40
    h, w = hit.shape
    return [int(hit[r:r + h // 2, c:c + w // 2].sum()) for r in (0, h // 2) for c in (0, w // 2)]


def test_report_of_a_3_step_run_draws_its_curves(tmp_path):
    from tests.conftest import FAST, write_pngs

    images = tmp_path / "imgs"
    write_pngs(images, 24, size=(28, 28))
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(images), *FAST, "data.batch_size=8", "optim.epochs=1", "--out", str(run),
                 "log.tensorboard=false"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3]  # a short run logs one row: a line through it draws nothing
    r = write_report(run, sample=16, prototypes=2, per_prototype=2, queries=2, neighbours=2)
    pixels = _curve_pixels(Path(r["path"]).read_text())
    assert all(p >= 10 for p in pixels), pixels  # every panel (loss, lr, images/s, prototypes) shows its point
