"""openseer curate: near-duplicate groups, balanced sampling, bad files, bad input, a curated list
that trains; and the uncurated-pile builder's determinism."""

from __future__ import annotations

import csv
import io
import json
from html import unescape
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from openseer.commands import main
from openseer.data.pile import PileSpec, build_pile, read_answer_key
from openseer.fileio import read_list
from openseer.train.loop import pretrain
from openseer.use.curate import balanced_sample, duplicate_groups, group_representatives, kmeans, water_fill
from tests.conftest import FAST, fmnist_available, snapshot, tiny_config, write_pngs
from tests.data.corpus import write_corpus


def test_duplicate_groups_recover_known_groups():
    rng = np.random.default_rng(0)
    d, truth, rows = 64, [], []
    sizes = [1] * 150 + [2] * 20 + [5] * 10 + [40, 300]
    for g, s in enumerate(sizes):
        base = rng.normal(size=d)
        base /= np.linalg.norm(base)
        for _ in range(s):
            v = base + rng.normal(scale=0.02, size=d)
            rows.append(v / np.linalg.norm(v))
            truth.append(g)
    perm = rng.permutation(len(rows))
    x = np.asarray(rows, np.float32)[perm]
    truth = np.asarray(truth)[perm]
    groups = duplicate_groups(x, 0.95)
    same_pred = groups[:, None] == groups[None, :]
    same_true = truth[:, None] == truth[None, :]
    off = ~np.eye(len(x), dtype=bool)
    tp = (same_pred & same_true & off).sum()
    precision = tp / max(1, (same_pred & off).sum())
    recall = tp / (same_true & off).sum()
    assert precision >= 0.99 and recall >= 0.99, (precision, recall)
    keep = group_representatives(x, groups)
    assert keep.sum() == len(sizes)  # one per group
    assert len(set(truth[keep])) == len(sizes)


def test_water_fill_and_balanced_sampling_even_out_a_skewed_set():
    assert water_fill([500, 100, 20, 5], 100) == [38, 37, 20, 5]
    assert water_fill([3, 3], 10) == [3, 3] and sum(water_fill([7, 9, 11], 13)) == 13
    rng = np.random.default_rng(1)
    sizes = [2000, 800, 300, 120, 60, 30, 15, 8]  # a long tail of well-separated clusters
    centres = rng.normal(size=(len(sizes), 32)) * 5
    x = np.concatenate([c + rng.normal(size=(s, 32)) for c, s in zip(centres, sizes)]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    truth = np.repeat(np.arange(len(sizes)), sizes)
    _, assign = kmeans(x, 24, seed=0)  # over-clustered, as curation does: each cluster is pure
    purity = sum(np.bincount(truth[assign == c]).max() for c in np.unique(assign)) / len(x)
    assert purity >= 0.99
    keep = balanced_sample([truth], 400, seed=0)
    assert keep.sum() == 400
    counts = np.bincount(truth[keep], minlength=len(sizes))
    # every cluster gives what it has up to an even share: 8+15+30+60 all kept, the rest ~equal
    assert counts[-4:].tolist() == [60, 30, 15, 8]
    assert counts[:4].max() - counts[:4].min() <= 1, counts
    # two levels: the budget is split over the coarse clusters first
    keep2 = balanced_sample([np.arange(8), np.array([0, 0, 0, 0, 1, 1, 1, 1])], 4)
    assert keep2.sum() == 4 and keep2[:4].sum() == 2


def _pile_folder(root: Path, n: int = 24) -> Path:
    write_pngs(root, n, size=(24, 24))
    img = Image.open(root / "img000.png")
    for k in range(6):  # near-duplicates of img000: re-encoded, flipped
        buf = io.BytesIO()
        (img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if k % 2 else img).save(buf, format="JPEG", quality=90 - k)
        (root / f"dup{k}.jpg").write_bytes(buf.getvalue())
    return root


def test_curate_skips_and_counts_bad_files_and_writes_every_output(tmp_path):
    pile = _pile_folder(tmp_path / "pile")
    bad, _good = write_corpus(tmp_path / "pile" / "corpus", special=False)
    out = tmp_path / "cur"
    # a random-init net maps these noise PNGs close together: a strict threshold keeps them apart
    assert main(["curate", str(pile), "--out", str(out), "--model", "test_resnet", "--keep", "0.5",
                 "--clusters", "4", "--dup-threshold", "0.99999", "--quiet", "--threads", "1"]) == 0
    s = json.loads((out / "curate.json").read_text())
    assert s["bad"] >= len([b for b in bad.values()]) - 2 and sum(s["bad_by_reason"].values()) == s["bad"]
    rows = list(csv.DictReader(open(out / "decisions.csv", newline="")))
    assert len(rows) == s["inputs"]
    kept = read_list(out / "list.txt")  # any name (not UTF-8, a newline): read back and opened again
    assert sum(r["kept"] == "yes" for r in rows) == s["kept"] == len(kept) and all(Path(p).is_file() for p in kept)
    assert {r["decision"].split(":")[0] for r in rows} <= {"kept", "duplicate", "balanced_out", "bad"}
    assert s["kept"] <= s["budget"] == round(0.5 * s["inputs"])
    html = (out / "report.html").read_text()
    assert "<h2>Near-duplicates</h2>" in html and "data:image/png;base64," in html and "http" not in html.split(
        "<body>")[1].split("xmlns")[0]
    excl = [k for k in (out / "exclude.txt").read_text().split("\n") if k and not k.startswith("#")]
    odd = sum(("\n" in r["key"] or "\t" in r["key"]) for r in rows if r["kept"] != "yes")  # no deny-list line holds them
    assert len(excl) == s["inputs"] - s["kept"] - odd and s["unlistable"] == odd


def test_curate_bad_input_is_one_message_and_nothing_is_overwritten(tmp_path, capsys):
    pile = _pile_folder(tmp_path / "pile", n=8)
    (tmp_path / "empty").mkdir()
    out = tmp_path / "cur"
    out.mkdir()
    (out / "mine.txt").write_text("do not touch")
    done = tmp_path / "done"
    before = snapshot(tmp_path)
    cases = [
        (["curate", str(tmp_path / "empty"), "--out", str(done), "--model", "test_resnet"], "no images"),
        (["curate", str(pile), "--out", str(done), "--model", "test_resnet", "--keep", "0"], "--keep must be in (0, 1]"),
        (["curate", str(pile), "--out", str(done), "--model", "test_resnet", "--keep", "1.5"], "--keep must be"),
        (["curate", str(pile), "--out", str(done), "--model", "test_resnet", "--keep-count", "999"],
         "more than the pile holds (14 images)"),
        (["curate", str(pile), "--out", str(done), "--model", "no_such_net_v9"], "no_such_net_v9"),
        (["curate", str(pile), "--out", str(done), "--model", "test_resnet", "--max-memory-gb", "0.000001"],
         "of memory and"),
        (["curate", str(pile), "--out", str(out), "--model", "test_resnet"], "holds no openseer curation"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main([*argv, "--quiet"]) != 0, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err
    assert snapshot(tmp_path) == before and not done.exists()


def test_a_curated_list_trains_end_to_end(tmp_path):
    pile = _pile_folder(tmp_path / "pile", n=40)
    out = tmp_path / "cur"
    assert main(["curate", str(pile), "--out", str(out), "--model", "test_resnet", "--keep-count", "20",
                 "--clusters", "4", "--dup-threshold", "0.99999", "--shards", "--quiet", "--threads", "1"]) == 0
    s = json.loads((out / "curate.json").read_text())
    assert s["kept"] == 20 and s["shards"]["images"] == 20
    cfg = tiny_config(f"data.source={out / 'shards'}", "data.batch_size=8", "optim.epochs=1", "data.epoch_samples=16")
    summary = pretrain(cfg, tmp_path / "run")
    assert summary["step"] == 2
    # or the kept files in place: list.txt is a --data the CLI takes
    assert main(["pretrain", "--data", str(out / "list.txt"), "--recipe", "tiny-cpu", "--out", str(tmp_path / "run2"),
                 *FAST, "data.batch_size=8", "optim.epochs=1"]) == 0
    prov = json.loads((tmp_path / "run2" / "data_provenance.json").read_text())
    assert prov["folder"]["kind"] == "file list" and prov["folder"]["files"] == 20
    assert [p.name for p in (tmp_path / "run2" / "checkpoints").glob("step_*.pt")] == ["step_00000002.pt"]
    # resumable: the same command again reuses the embeddings
    assert main(["curate", str(pile), "--out", str(out), "--model", "test_resnet", "--keep-count", "20",
                 "--clusters", "4", "--dup-threshold", "0.99999", "--quiet", "--threads", "1"]) == 0
    assert json.loads((out / "curate.json").read_text())["kept"] == 20


@fmnist_available
def test_the_pile_builder_is_deterministic(tmp_path):
    from tests.data.test_nearcopy import photo

    photos = [("synthetic-a", photo(1)), ("synthetic-b", photo(2))]
    spec = PileSpec(seed=3, in_domain=60, off_domain=12, noise=4, blank=4, dup_sources=6, dup_copies=40, dup_max=20)
    a = build_pile(tmp_path / "a", spec, photos=photos)
    b = build_pile(tmp_path / "b", spec, photos=photos)
    assert a["digest"] == b["digest"] and a["files"] == spec.total() == 120
    assert a["kinds"] == {"in_domain": 60, "off_domain": 12, "noise": 4, "blank": 4, "near_duplicate": 40}
    assert sorted(a["in_domain_per_class"], reverse=True)[0] > 3 * sorted(a["in_domain_per_class"])[0] > 0
    assert max(a["group_sizes_top"]) == 20
    key = read_answer_key(tmp_path / "a")
    assert len(key) == 120 and all((tmp_path / "a" / n).is_file() for n in key)
    c = build_pile(tmp_path / "c", PileSpec(**{**spec.__dict__, "seed": 4}), photos=photos)
    assert c["digest"] != a["digest"]
    with pytest.raises(ValueError, match="no photographs"):
        build_pile(tmp_path / "d", spec, photos=[])


def test_curate_reports_the_off_domain_share_against_a_reference(tmp_path):
    pile = _pile_folder(tmp_path / "pile", n=20)
    ref = tmp_path / "ref"
    write_pngs(ref, 6, prefix="r", size=(24, 24))
    out = tmp_path / "cur"
    assert main(["curate", str(pile), "--out", str(out), "--model", "test_resnet", "--keep", "1", "--levels", "2",
                 "--clusters", "6", "--dup-threshold", "0.99999", "--reference", str(ref), "--drop-off-domain",
                 "--quiet", "--threads", "1"]) == 0
    s = json.loads((out / "curate.json").read_text())
    od = s["off_domain"]
    assert od["given"] and od["images"] == 6 and 0 <= od["share"] <= 1 and od["dropped"]
    rows = list(csv.DictReader(open(out / "decisions.csv", newline="")))
    assert sum(r["decision"] == "off_domain" for r in rows) == od["found"] - sum(
        r["off_domain"] == "yes" and r["decision"] == "duplicate" for r in rows)
    assert all(r["reference_similarity"] for r in rows)
    assert "off-domain" in (out / "report.html").read_text()


def test_curate_by_descriptor_groups_the_re_encoded_and_flipped_copies(tmp_path):
    pile = _pile_folder(tmp_path / "pile", n=20)  # img000 + 6 JPEG copies (3 flipped) + 19 distinct
    out = tmp_path / "cur"
    assert main(["curate", str(pile), "--out", str(out), "--model", "test_resnet", "--keep", "1", "--dup-by",
                 "descriptor", "--dup-threshold", "0.9", "--clusters", "4", "--quiet", "--threads", "1"]) == 0
    rows = list(csv.DictReader(open(out / "decisions.csv", newline="")))
    groups = {r["key"]: r["group"] for r in rows}
    copies = ["img000.png"] + [f"dup{k}.jpg" for k in range(6)]
    assert len({groups[k] for k in copies}) == 1 and groups["img000.png"] != ""
    assert all(groups[f"img{i:03d}.png"] == "" for i in range(1, 20))  # distinct images stay alone
    assert json.loads((out / "curate.json").read_text())["kept"] == 20


def test_a_chain_of_look_alikes_is_cut_into_groups_around_seeds():
    # rows 0..29 on a great circle 0.1 rad apart: each links to its neighbour (cos 0.995 >= 0.99),
    # so the links form one chain 2.9 rad long; a group is those within the threshold of its seed
    t = np.arange(30) * 0.1
    x = np.zeros((30, 8), np.float32)
    x[:, 0], x[:, 1] = np.cos(t), np.sin(t)
    groups = duplicate_groups(x, 0.99, k=3)
    assert len(set(groups.tolist())) >= 10  # connected components alone would give one
    for g in set(groups.tolist()):
        m = np.flatnonzero(groups == g)
        assert len(m) <= 3 and (x[m] @ x[m].T).min() >= 0.98  # a seed and its two neighbours at most


def test_pile_images_do_not_carry_the_photographs_colour_profile():
    from PIL import ImageCms

    from openseer.data.pile import _encode

    photo = Image.new("RGB", (40, 40), (90, 120, 30))
    photo.info["icc_profile"] = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    grey = photo.convert("L").resize((28, 28))
    assert "icc_profile" in grey.info  # PIL keeps it through convert and resize
    for fmt in ("PNG", "JPEG"):
        assert "icc_profile" not in Image.open(io.BytesIO(_encode(grey, fmt))).info


def test_a_duplicate_group_keeps_its_largest_copy_by_pixels_then_bytes():
    x = np.eye(4, dtype=np.float32)[[0, 0, 0, 1, 1, 2]] + 0.01
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    groups = np.array([0, 0, 0, 1, 1, 2])
    q = np.array([[100, 50], [400, 10], [400, 20], [9, 9], [9, 9], [1, 1]])
    keep = group_representatives(x, groups, q)
    assert keep.tolist() == [False, False, True, True, False, True]  # most pixels, then most bytes; a tie: typical


def test_curate_links_crops_to_their_original_and_keeps_the_original(tmp_path):
    from tests.data.test_nearcopy import photo

    pile = tmp_path / "pile"
    pile.mkdir()
    orig = photo(5, (320, 240))
    W, H = orig.size
    orig.save(pile / "original.png")
    orig.resize((W // 2, H // 2)).save(pile / "half.png")  # a thumbnail
    orig.save(pile / "q30.jpg", quality=30)  # same size, fewer bytes
    orig.crop((int(0.1 * W), int(0.1 * H), int(0.9 * W), int(0.9 * H))).save(pile / "centre80.png")
    orig.crop((0, 0, int(0.8 * W), int(0.8 * H))).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(pile / "corner_flip.png")
    orig.crop((int(0.05 * W), int(0.05 * H), int(0.95 * W), int(0.95 * H))).save(pile / "centre90.jpg", quality=60)
    copies = ["original.png", "half.png", "q30.jpg", "centre80.png", "corner_flip.png", "centre90.jpg"]
    for i in range(12):
        photo(40 + i, (160, 120)).save(pile / f"other{i:02d}.png")
    out = tmp_path / "cur"
    assert main(["curate", str(pile), "--out", str(out), "--model", "test_resnet", "--keep", "1", "--clusters", "3",
                 "--quiet", "--threads", "1"]) == 0
    rows = {r["key"]: r for r in csv.DictReader(open(out / "decisions.csv", newline=""))}
    assert len({rows[k]["group"] for k in copies}) == 1 and rows["original.png"]["group"] != ""
    assert all(rows[f"other{i:02d}.png"]["group"] == "" for i in range(12))
    assert rows["original.png"]["kept"] == "yes"
    assert all(rows[k]["decision"] == "duplicate" and rows[k]["duplicate_of"] == "original.png" for k in copies[1:])
    s = json.loads((out / "curate.json").read_text())
    assert "--dup-by descriptor" in s["duplicate_method"] and "crop windows" in s["duplicate_method"]
    assert "largest copy" in s["duplicate_method"] and "stars" in s["duplicate_method"]
    assert s["duplicate_method"] in unescape((out / "report.html").read_text())
    assert (pile / ".openseer-index" / "index.json").is_file()  # the descriptors were stored beside the pile
    # by embedding, the report says so
    out2 = tmp_path / "cur2"
    assert main(["curate", str(pile), "--out", str(out2), "--model", "test_resnet", "--keep", "1", "--clusters", "3",
                 "--dup-by", "embedding", "--dup-threshold", "0.99999", "--quiet", "--threads", "1"]) == 0
    assert "--dup-by embedding" in json.loads((out2 / "curate.json").read_text())["duplicate_method"]


def test_curate_reads_an_existing_embed_folder_of_the_same_model_instead_of_embedding(tmp_path, capsys):
    """`openseer embed` once, then `curate --embeddings`: the same decisions as embedding the pile again,
    no embedding pass; a folder of another model (or other images) is refused, naming what differs."""
    pile = _pile_folder(tmp_path / "pile")
    args = ["--model", "test_resnet", "--keep", "0.5", "--clusters", "4", "--dup-by", "embedding",
            "--dup-threshold", "0.99999", "--quiet", "--threads", "1"]
    assert main(["embed", "test_resnet", "--data", str(pile), "--out", str(tmp_path / "emb"), "--quiet"]) == 0
    assert main(["curate", str(pile), "--out", str(tmp_path / "a"), *args]) == 0
    assert main(["curate", str(pile), "--out", str(tmp_path / "b"), "--embeddings", str(tmp_path / "emb"), *args]) == 0
    assert not (tmp_path / "b" / "embed").exists() and (tmp_path / "a" / "embed").is_dir()
    assert json.loads((tmp_path / "b" / "curate.json").read_text())["embeddings_from"] == str(tmp_path / "emb")
    assert (tmp_path / "b" / "decisions.csv").read_text() == (tmp_path / "a" / "decisions.csv").read_text()
    capsys.readouterr()
    assert main(["curate", str(pile), "--out", str(tmp_path / "c"), "--embeddings", str(tmp_path / "emb"),
                 *[a if a != "test_resnet" else "test_byobnet" for a in args]]) == 2
    assert "weights_hash" in capsys.readouterr().err
