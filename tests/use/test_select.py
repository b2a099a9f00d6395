"""openseer select: known answers for the choice (one pick per separated cluster, the largest first,
never two near-copies, labelled clusters covered) and the whole job on a folder with bad files."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from openseer.fileio import text_to_name
from openseer.use.curate import duplicate_groups, group_representatives
from openseer.use.select import choose, select, typicality
from tests.conftest import write_pngs
from tests.data.corpus import write_corpus


def _blobs(sizes: list[int], d: int = 32, spread: float = 0.15, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit rows around well-separated random centres: (x, true blob of each row, centres)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rows, truth = [], []
    for b, n in enumerate(sizes):
        v = centres[b] + rng.normal(scale=spread / np.sqrt(d), size=(n, d))
        rows.append(v / np.linalg.norm(v, axis=1, keepdims=True))
        truth += [b] * n
    perm = rng.permutation(sum(sizes))
    return np.concatenate(rows).astype(np.float32)[perm], np.asarray(truth)[perm], centres


def test_typicality_is_highest_at_the_centre_of_a_cluster():
    x, _, centres = _blobs([200], spread=0.6)
    typ = typicality(x)
    nearest_centre = np.argmax(x @ centres[0])
    assert typ[nearest_centre] >= np.quantile(typ, 0.9)
    assert typicality(x[:1]).tolist() == [0.0]  # a lone row


def test_one_typical_pick_per_separated_cluster():
    sizes = [30, 25, 20, 15, 10, 8]
    x, truth, centres = _blobs(sizes)
    picks = choose(x, budget=6)
    assert sorted(truth[p.row] for p in picks) == list(range(6))  # every cluster once
    for p in picks:  # and a typical member: among the nearest to its cluster's centre
        b = truth[p.row]
        sims = x[truth == b] @ centres[b]
        assert float(x[p.row] @ centres[b]) >= np.quantile(sims, 0.5)
    # a smaller budget goes to the largest clusters first
    assert sorted(truth[p.row] for p in choose(x, budget=3)) == [0, 1, 2]


def test_near_duplicates_are_never_both_picked():
    x, truth, _ = _blobs([12, 10, 8])
    copies = np.repeat(x, 4, axis=0)  # every image 4 times, nearly identical
    copies += np.random.default_rng(1).normal(scale=1e-4, size=copies.shape).astype(np.float32)
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    groups = duplicate_groups(copies, 0.999)
    assert len(np.unique(groups)) == len(x)
    # more picks than clusters: a cluster gives several, but never two copies of one image
    picks = choose(copies, budget=12, candidates=group_representatives(copies, groups))
    assert len(picks) == 12 and len({groups[p.row] for p in picks}) == 12


def test_labelled_images_cover_their_clusters():
    x, truth, centres = _blobs([40, 35, 30, 25])
    labelled = np.stack([centres[0], centres[1]]).astype(np.float32)
    picks = choose(x, budget=2, labelled=labelled)
    assert sorted(truth[p.row] for p in picks) == [2, 3]
    assert choose(x, budget=0) == []


def _pile(root: Path) -> Path:
    write_pngs(root, 20, size=(24, 24))
    img = Image.open(root / "img000.png")
    for k in range(4):  # near-copies of img000 (re-encoded, flipped)
        buf = io.BytesIO()
        (img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if k % 2 else img).save(buf, format="JPEG", quality=95 - k)
        (root / f"dup{k}.jpg").write_bytes(buf.getvalue())
    return root


def test_select_writes_a_sheet_and_extends_a_labelled_set(tmp_path):
    pile = _pile(tmp_path / "pile")
    bad, _ = write_corpus(tmp_path / "pile" / "corpus", special=False)
    out = tmp_path / "sel"
    s = select(str(pile), out, "test_resnet", budget=6, progress=False, log=lambda *_: None)
    assert s["chosen"] == 6 and s["bad"] >= len(bad) - 2 and sum(s["bad_by_reason"].values()) == s["bad"]
    rows = list(csv.DictReader(open(out / "to_label.csv", newline="")))
    assert list(rows[0])[:2] == ["path", "label"] and len(rows) == 6
    assert all(Path(text_to_name(r["path"])).is_file() and r["label"] == "" for r in rows)
    assert sum(Path(r["path"]).name.startswith(("img000", "dup")) for r in rows) <= 1  # one of the copies at most
    sheet = (out / "to_label.html").read_text()
    assert sheet.count("<figure>") == 6 and "data:image/png;base64," in sheet
    assert json.loads((out / "select.json").read_text())["chosen"] == 6

    # a person labels them (path,label), then asks for 6 more: none of the first 6 again
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows([r["path"], f"c{i % 2}"] for i, r in enumerate(rows))
    s2 = select(str(pile), tmp_path / "sel2", "test_resnet", budget=6, labelled=str(tmp_path / "labels.csv"),
                progress=False, log=lambda *_: None)
    rows2 = list(csv.DictReader(open(tmp_path / "sel2" / "to_label.csv", newline="")))
    assert s2["labelled_in_pile"] == 6 and len(rows2) == 6
    assert not {r["path"] for r in rows} & {r["path"] for r in rows2}
