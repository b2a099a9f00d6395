"""Images beyond RGB photos through the one reader: DICOM (rescale, window, MONOCHROME1, frames, a
missing decoder as a counted skip) and full depth for one-channel backbones (16-bit PNG through the
reader, multi-crop and ``shard``). Only pydicom's bundled test files and files written here."""

from __future__ import annotations

import csv
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.uid import JPEGLSLossless

from openseer.config import ConfigError
from openseer.data.batches import iterate_batches
from openseer.data.collection import SkipCounts, open_collection, require_usable
from openseer.data.decode import BadImage, DataError, Decoding, decode_bytes, dicom_pixels
from openseer.data.multicrop import BatchMultiCrop, FastMultiCrop, MultiCrop
from openseer.data.shards import write_shards
from tests.conftest import tiny_config
from tests.data.dicoms import bundled, write_dicom

GREY = Decoding(channels=1)
RAMP = (np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 30)  # 0 .. 3570


def _grey(path, window="auto", frame=None) -> np.ndarray:
    return np.asarray(decode_bytes(path.read_bytes(), str(path), decoding=Decoding(1, window), frame=frame))


def test_monochrome1_is_inverted(tmp_path):
    m2 = _grey(write_dicom(tmp_path / "m2.dcm", RAMP, bits_stored=12), window="none")
    m1 = _grey(write_dicom(tmp_path / "m1.dcm", RAMP, photometric="MONOCHROME1", bits_stored=12), window="none")
    assert m2[0, 1] == pytest.approx(30 / 4095) and m2[-1, -1] == pytest.approx(3570 / 4095)
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)  # bright is always high
    rgb = np.asarray(decode_bytes((tmp_path / "m1.dcm").read_bytes(), "m1", decoding=Decoding(3, "none")))
    assert rgb.shape == (12, 10, 3) and rgb[0, 0, 0] == 255 and rgb[-1, -1, 0] == round(255 * (1 - 3570 / 4095))


def test_rescale_slope_and_intercept(tmp_path):
    # stored 0..3570, slope 2, intercept -1000: values -1000 .. 6140; a window in those units sees them
    path = write_dicom(tmp_path / "r.dcm", RAMP, slope=2.0, intercept=-1000.0, bits_stored=12)
    y = _grey(path, window="0,2001")  # linear window [-1000, 1000] over the rescaled values
    expected = np.clip(((RAMP * 2.0 - 1000.0) - (0 - 0.5)) / 2000.0 + 0.5, 0, 1)
    np.testing.assert_allclose(y, expected, atol=1e-6)
    assert y[0, 0] == pytest.approx(0.5 / 2000) and 0 < y[1, 6] < 1 and y[-1, -1] == 1.0
    # 'none': the stored bits' real range, rescaled: [-1000, 4095 * 2 - 1000]
    np.testing.assert_allclose(_grey(path, window="none"), (RAMP * 2.0) / (4095 * 2.0), atol=1e-6)
    # pydicom's bundled CT: stored values with intercept -1024, so the air around the phantom is -1024 HU
    ct = bundled("CT_small.dcm")
    import pydicom

    hu = pydicom.dcmread(ct).pixel_array.astype(np.float64) - 1024.0
    y = _grey(ct, window="40,400")  # soft tissue: [-160, 240] HU
    np.testing.assert_allclose(y, np.clip((hu - 39.5) / 399.0 + 0.5, 0, 1), atol=1e-6)
    assert (y[hu <= -160] == 0).all() and (y[hu >= 240] == 1).all()


def test_window_from_the_file_first_value_else_min_max_and_configured(tmp_path):
    multi = write_dicom(tmp_path / "w.dcm", RAMP, window=((1000, 500), (400, 100)))  # two windows: the first
    y = _grey(multi)
    np.testing.assert_allclose(y, np.clip((RAMP - 999.5) / 399.0 + 0.5, 0, 1), atol=1e-6)
    plain = write_dicom(tmp_path / "p.dcm", RAMP)  # no window in the file: the frame's own min..max
    np.testing.assert_allclose(_grey(plain), RAMP / 3570.0, atol=1e-6)
    np.testing.assert_allclose(_grey(multi, window="2000,1001"), np.clip((RAMP - 1999.5) / 1000.0 + 0.5, 0, 1),
                               atol=1e-6)
    mr = _grey(bundled("MR_small.dcm"))  # the bundled MR's own window (600, 1600)
    import pydicom

    raw = pydicom.dcmread(bundled("MR_small.dcm")).pixel_array.astype(np.float64)
    np.testing.assert_allclose(mr, np.clip((raw - 599.5) / 1599.0 + 0.5, 0, 1), atol=1e-6)
    with pytest.raises(DataError, match="dicom_window"):
        decode_bytes(plain.read_bytes(), "p", decoding=Decoding(1, "soft tissue"))


def test_config_keys_are_checked():
    assert tiny_config("data.dicom_window=40,400", "data.dicom_frames=all", "model.in_chans=1").model.in_chans == 1
    for bad, what in (("data.dicom_window=wide", "dicom_window"), ("data.dicom_window=40,0", "width"),
                      ("data.dicom_frames=some", "dicom_frames"), ("model.in_chans=2", "in_chans")):
        with pytest.raises(ConfigError, match=what):
            tiny_config(bad)


def _frames(tmp_path):
    stack = np.stack([np.full((6, 8), v, np.uint16) for v in (100, 2000, 4000)])
    stack[:, 0, 0] = 0  # so each frame's min..max window keeps its level visible
    stack[:, -1, -1] = 4095
    root = tmp_path / "frames"
    root.mkdir()
    write_dicom(root / "vol.dcm", stack, bits_stored=12)
    write_dicom(root / "single.dcm", RAMP, bits_stored=12)
    return root


def test_multi_frame_middle_by_default_and_every_frame_as_a_row(tmp_path, monkeypatch):
    root = _frames(tmp_path)
    level = [100 / 4095, 2000 / 4095, 4000 / 4095]
    assert _grey(root / "vol.dcm", "none")[3, 3] == pytest.approx(level[1])  # the middle frame
    assert _grey(root / "vol.dcm", "none", frame=2)[3, 3] == pytest.approx(level[2])
    with pytest.raises(BadImage, match="no frame 3"):
        _grey(root / "vol.dcm", frame=3)

    cfg = tiny_config("data.dicom_window=none").data
    coll = open_collection(str(root), data_cfg=cfg, channels=1)
    assert [coll.key(i) for i in range(len(coll))] == ["single.dcm", "vol.dcm"]

    cfg = tiny_config("data.dicom_window=none", "data.dicom_frames=all").data
    coll = open_collection(str(root), data_cfg=cfg, channels=1)
    keys = [coll.key(i) for i in range(len(coll))]
    assert keys == ["single.dcm", "vol.dcm#0", "vol.dcm#1", "vol.dcm#2"]
    for i, lv in zip(range(1, 4), level):
        assert np.asarray(coll.load(i))[3, 3] == pytest.approx(lv)
    rows = {key: t for _, key, _, t in coll.read_chunk(coll.chunks[0])}
    assert rows["vol.dcm#2"].dtype == torch.float32 and rows["vol.dcm#2"].shape == (1, 6, 8)
    assert float(rows["vol.dcm#0"][0, 3, 3]) == pytest.approx(level[0])
    assert coll.subset([3]).key(0) == "vol.dcm#2" and coll.subset([3]).decoding == coll.decoding

    # a deny-list names a frame or the whole file
    (root / "takedowns.txt").write_text("vol.dcm#1\n")
    skips = SkipCounts()
    used = [it.key for it in open_collection(str(root), data_cfg=cfg).items(skips=skips) if it.ok]
    assert used == ["single.dcm", "vol.dcm#0", "vol.dcm#2"] and skips["denied"] == 1
    (root / "takedowns.txt").write_text("vol.dcm\n")
    skips = SkipCounts()
    used = [it.key for it in open_collection(str(root), data_cfg=cfg).items(skips=skips) if it.ok]
    assert used == ["single.dcm"] and skips["denied"] == 3

    # commands without a data config: the environment
    monkeypatch.setenv("OPENSEER_DICOM_FRAMES", "all")
    assert len(open_collection(str(root))) == 4
    monkeypatch.setenv("OPENSEER_DICOM_FRAMES", "every")
    with pytest.raises(DataError, match="OPENSEER_DICOM_FRAMES"):
        open_collection(str(root))


def test_a_compressed_syntax_without_its_decoder_is_a_counted_skip(tmp_path):
    from pydicom.pixels import get_decoder

    assert not get_decoder(JPEGLSLossless).is_available  # the premise: no JPEG-LS plugin in this venv
    root = tmp_path / "pile"
    root.mkdir()
    write_dicom(root / "good.dcm", RAMP)
    write_dicom(root / "written_jls.dcm", RAMP, syntax=JPEGLSLossless, encapsulated=b"\xff\xd8\xff\xf7 data")
    (root / "bundled_jls.dcm").write_bytes(bundled("MR_small_jpeg_ls_lossless.dcm").read_bytes())
    (root / "report.dcm").write_bytes(bundled("rtplan.dcm").read_bytes())
    with pytest.raises(BadImage) as e:
        dicom_pixels((root / "written_jls.dcm").read_bytes(), "written_jls.dcm")
    assert e.value.reason == "no_decoder" and "JPEG-LS" in str(e.value) and "pylibjpeg" in str(e.value)
    coll = open_collection(str(root))
    skips = SkipCounts()
    items = list(coll.items(skips=skips))
    assert [it.key for it in items if it.ok] == ["good.dcm"]
    assert skips.by_reason() == {"no_decoder": 2, "not_an_image": 1}
    assert "no_decoder 2" in skips.summary()
    require_usable(coll, skips)  # one good file: usable
    reasons = {key: r for _, key, _, r in coll.read_chunk(coll.chunks[0]) if isinstance(r, str)}
    assert reasons["bundled_jls.dcm"].startswith("no_decoder: JPEG-LS")


def _png16(path, arr: np.ndarray):
    Image.fromarray(arr.astype(np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    return path


def test_16_bit_png_keeps_its_depth_through_the_reader(tmp_path):
    arr = (np.arange(40 * 30).reshape(30, 40) * 3 + 1000).astype(np.uint16)  # steps of 3/65535: below 8 bits
    root = tmp_path / "deep"
    root.mkdir()
    _png16(root / "scan.png", arr)
    grey = open_collection(str(root), channels=1)
    x = next(t for _, _, _, t in grey.read_chunk(grey.chunks[0]))
    assert x.dtype == torch.float32 and x.shape == (1, 30, 40)
    np.testing.assert_allclose(x[0].numpy(), arr / 65535.0, rtol=1e-6)
    assert len(np.unique(x.numpy())) == arr.size  # every level kept: 8 bits would merge them
    rgb = open_collection(str(root))  # in_chans 3: as today, 8-bit RGB
    y = next(t for _, _, _, t in rgb.read_chunk(rgb.chunks[0]))
    assert y.dtype == torch.uint8 and y.shape == (3, 30, 40) and len(np.unique(y.numpy())) < 20
    reduced = grey.load(0, min_pixels=300)  # a reduced decode stays float (box filter on F)
    assert reduced.mode == "F" and reduced.size == (20, 15)


def test_one_channel_multicrop_keeps_the_depth_and_uses_one_mean(tmp_path):
    cfg = tiny_config("crops.mean=[0.5]", "crops.std=[0.25]", "crops.jitter_p=1", "crops.blur_p=0.5").crops
    arr = (np.linspace(0.2, 0.2 + 40 / 65535, 48 * 48).reshape(48, 48)).astype(np.float32)  # < 1/255 in all
    img = Image.fromarray(arr, mode="F")
    crops = FastMultiCrop(cfg, channels=1)(img, torch.Generator().manual_seed(0))
    assert [tuple(c.shape) for c in crops] == [(1, s, s) for s, n in zip(cfg.sizes, cfg.counts) for _ in range(n)]
    plain = FastMultiCrop(tiny_config("crops.mean=[0.5]", "crops.std=[0.25]", "crops.jitter_p=0", "crops.blur_p=0",
                                      "crops.flip_p=0").crops, channels=1)(img, torch.Generator().manual_seed(0))
    values = plain[0] * 0.25 + 0.5
    assert len(torch.unique(values)) > 10  # 8 bits would leave one or two levels
    assert float(values.min()) >= 0.2 - 1e-6 and float(values.max()) <= 0.2 + 41 / 65535
    # the torchvision reference and the batched path: 1 channel, RGB means averaged to one value
    every_op = tiny_config("crops.jitter_p=1", "crops.grayscale_p=1", "crops.blur_p=1").crops
    assert [tuple(c.shape[:1]) for c in MultiCrop(every_op, channels=1)(img)] == [(1,)] * sum(cfg.counts)
    batch = BatchMultiCrop(every_op, channels=1)(torch.rand(3, 1, 28, 28), torch.Generator().manual_seed(2))
    assert all(c.shape[:2] == (3, 1) and torch.isfinite(c).all() for c in batch)  # float input: used as is
    batch = BatchMultiCrop(tiny_config().crops, channels=1)(torch.randint(0, 255, (4, 1, 28, 28), dtype=torch.uint8),
                                                             torch.Generator().manual_seed(1))
    assert all(c.shape[:2] == (4, 1) for c in batch)
    rgb = tiny_config("crops.mean=[0.485,0.456,0.406]").crops
    assert BatchMultiCrop(rgb, channels=1).mean.flatten().tolist() == pytest.approx([(0.485 + 0.456 + 0.406) / 3])


def test_training_batches_of_dicom_have_the_backbones_channels(tmp_path):
    root = _frames(tmp_path)
    for chans in (1, 3):
        cfg = tiny_config(f"model.in_chans={chans}", "data.batch_size=2", "data.num_workers=0",
                          "data.dicom_frames=all", f"data.source={root}")
        source = open_collection(str(root), data_cfg=cfg.data, channels=chans)
        batch = next(iter(iterate_batches(source, cfg, 0, 1, 0, 1)))
        assert all(c.shape[:2] == (2, chans) for c in batch.crops), [c.shape for c in batch.crops]
        assert all(k.startswith(("vol.dcm#", "single.dcm")) for k in batch.keys)


def test_shard_keeps_16_bits_for_deep_png_and_dicom(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    arr = (np.arange(64 * 48).reshape(48, 64) * 7).astype(np.uint16)
    _png16(root / "big16.png", arr)  # resized by --max-side: must stay 16-bit
    _png16(root / "small16.png", arr[:8, :8] + 5)  # kept byte for byte
    write_dicom(root / "ct.dcm", RAMP, slope=2.0, intercept=-1000.0, window=(0, 2001), bits_stored=12)
    write_dicom(root / "vol.dcm", np.stack([RAMP, RAMP + 5, RAMP + 9]), bits_stored=12)
    out = tmp_path / "shards"
    summary = write_shards(root, out, max_side=32, workers=1)
    assert summary["counts"] == {"stored": 4}
    with open(out / "manifest.csv", newline="") as f:
        rows = {r["source"]: r for r in csv.DictReader(f)}
    assert rows["ct.dcm"]["format"] == "DICOM" and rows["ct.dcm"]["stored_format"] == "png"
    with tarfile.open(out / "000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}

    def stored(source):
        return Image.open(io.BytesIO(members[f"{rows[source]['key']}.png"]))

    big = stored("big16.png")
    assert big.mode == "I;16" and big.size == (32, 24)
    assert len(np.unique(np.asarray(big))) > 256  # more levels than 8 bits hold
    assert members[f"{rows['small16.png']['key']}.png"] == (root / "small16.png").read_bytes()
    ct = stored("ct.dcm")
    assert ct.mode == "I;16" and ct.size == (10, 12)
    np.testing.assert_array_equal(np.asarray(ct), np.round(_grey(root / "ct.dcm") * 65535).astype(np.uint16))
    # the shard reader reads it back at full depth without pydicom
    sh = open_collection(str(out), channels=1)
    got = {it.key: np.asarray(it.image) for it in sh.items() if it.ok}
    np.testing.assert_allclose(got[rows["ct.dcm"]["key"]], _grey(root / "ct.dcm"), atol=1 / 65535)
    assert json.loads((out / "index.json").read_text())["params"]["dicom_window"] == "auto"


def test_shard_every_frame_and_refuses_another_window_on_resume(tmp_path, monkeypatch):
    root = _frames(tmp_path)
    monkeypatch.setenv("OPENSEER_DICOM_FRAMES", "all")
    out = tmp_path / "shards"
    summary = write_shards(root, out, workers=1)
    assert summary["counts"] == {"stored": 4}  # frames of one file are not duplicates of each other
    with open(out / "manifest.csv", newline="") as f:
        sources = sorted(r["source"] for r in csv.DictReader(f))
    assert sources == ["single.dcm", "vol.dcm#0", "vol.dcm#1", "vol.dcm#2"]
    monkeypatch.setenv("OPENSEER_DICOM_WINDOW", "40,400")
    with pytest.raises(DataError, match="dicom_window"):
        write_shards(root, out, workers=1)


def test_a_folder_of_dicom_through_embed_and_shard_as_a_user_would(tmp_path, capsys, monkeypatch):
    """`openseer embed` (a tiny model) and `openseer shard` on a folder of DICOM files, then embed on the shards."""
    from openseer.commands import main
    from openseer.use.embed import load_embeddings
    from tests.use.kit import make_run

    folder = tmp_path / "archive"
    (folder / "ct").mkdir(parents=True)
    (folder / "ct" / "CT_small.dcm").write_bytes(bundled("CT_small.dcm").read_bytes())
    (folder / "MR_small.dcm").write_bytes(bundled("MR_small.dcm").read_bytes())
    (folder / "jls.dcm").write_bytes(bundled("MR_small_jpeg_ls_lossless.dcm").read_bytes())
    write_dicom(folder / "cr.dicom", RAMP, photometric="MONOCHROME1", bits_stored=12)
    write_dicom(folder / "vol.dcm", np.stack([RAMP, RAMP[::-1], RAMP * 0 + 77]), bits_stored=12)
    run = make_run(tmp_path / "run")
    monkeypatch.setenv("OPENSEER_DICOM_FRAMES", "all")
    assert main(["embed", str(run), "--data", str(folder), "--out", str(tmp_path / "emb"), "--quiet",
                 "--dtype", "float32"]) == 0
    assert "skipped 1 images (no_decoder 1)" in capsys.readouterr().err
    arr, index = load_embeddings(tmp_path / "emb")
    keys = [r["key"] for r in index]
    assert keys == ["MR_small.dcm", "cr.dicom", "ct/CT_small.dcm", "vol.dcm#0", "vol.dcm#1", "vol.dcm#2"]
    with open(tmp_path / "emb" / "bad.csv", newline="") as f:
        assert [(r["key"], r["reason"].split(":")[0]) for r in csv.DictReader(f)] == [("jls.dcm", "no_decoder")]
    assert np.isfinite(arr).all() and not np.allclose(arr[3], arr[5])  # the frames are different images

    assert main(["shard", str(folder), "--out", str(tmp_path / "shards"), "-q", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "6 images in 1 shard(s)" in out and "no_decoder" in out
    assert main(["embed", str(run), "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "emb2"), "--quiet",
                 "--dtype", "float32"]) == 0
    arr2, index2 = load_embeddings(tmp_path / "emb2")
    assert len(index2) == 6
    with open(tmp_path / "shards" / "manifest.csv", newline="") as f:
        source_of = {r["key"]: r["source"] for r in csv.DictReader(f)}
    by_source = {source_of[r["key"]]: arr2[i] for i, r in enumerate(index2)}
    for i, key in enumerate(keys):  # a 16-bit PNG of the same window: the same image to within rounding
        a, b = arr[i], by_source[key]
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99, key


def test_eval_reads_full_depth_grey_for_a_one_value_mean(tmp_path):
    """The eval transform of a one-channel backbone (a mean of one value): grey in, one channel out,
    16-bit levels kept; with RGB statistics it replicates grey as before."""
    from openseer.eval.common import EvalTransform, Labelled

    root = tmp_path / "a"
    root.mkdir()
    arr = (np.arange(16 * 16).reshape(16, 16) * 2 + 30000).astype(np.uint16)  # 2/65535 steps
    _png16(root / "x.png", arr)
    coll = open_collection(str(root), channels=1)
    x = Labelled(coll, np.zeros(1, np.int64)).load(0)
    assert x.dtype == torch.float32 and x.shape == (1, 16, 16)
    grey = EvalTransform(16, (0.5,), (0.25,))
    y = grey(x.unsqueeze(0))
    assert y.shape == (1, 1, 16, 16)
    np.testing.assert_allclose((y[0, 0] * 0.25 + 0.5).numpy(), arr / 65535.0, rtol=1e-5)
    assert len(torch.unique(y)) == arr.size
    rgb = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)  # RGB to a grey backbone: luminance
    lum = (0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]) / 255
    np.testing.assert_allclose(grey.geometry(rgb).numpy(), lum.numpy(), atol=1e-6)
    three = EvalTransform(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert three(x.unsqueeze(0)).shape == (1, 3, 16, 16)
    # `openseer eval`'s labelled class folders: read at full depth for a one-channel backbone only
    from openseer.eval.common import open_labelled, read_for

    for c in ("p", "q"):
        (tmp_path / "lab" / c).mkdir(parents=True)
        for i in range(3):
            _png16(tmp_path / "lab" / c / f"{i}.png", arr + i)
    data = open_labelled(str(tmp_path / "lab"), test_fraction=0.5)
    assert data.train.load(0).dtype == torch.uint8
    read_for(data, three)
    assert data.train.load(0).dtype == torch.uint8
    read_for(data, grey)
    assert data.train.load(0).dtype == torch.float32 and data.test.load(0).shape == (1, 16, 16)


def test_listing_every_frame_never_opens_a_fifo_and_tolerates_broken_headers(tmp_path, monkeypatch):
    import os
    import time

    root = _frames(tmp_path)
    os.mkfifo(root / "pipe.dcm")
    (root / "junk.dcm").write_bytes(b"not dicom at all")
    monkeypatch.setenv("OPENSEER_DICOM_FRAMES", "all")
    t0 = time.perf_counter()
    coll = open_collection(str(root), read_timeout=30)
    assert time.perf_counter() - t0 < 10  # the FIFO was not opened (it would block until the timeout)
    skips = SkipCounts()
    keys = [it.key for it in coll.items(skips=skips) if it.ok]
    assert keys == ["single.dcm", "vol.dcm#0", "vol.dcm#1", "vol.dcm#2"]
    assert skips.by_reason() == {"not_a_file": 1, "not_an_image": 1}


@pytest.mark.slow
def test_a_dicom_folder_through_pretrain_init_at_one_channel_then_embed(tmp_path, capsys, monkeypatch):
    """The adapt path a hospital takes: an RGB run's weights, a folder of DICOM scans read as one channel
    at full depth (the stem adapted 3 -> 1), two SwAV steps, then embed the same folder with the result."""
    from openseer.commands import main
    from openseer.use.embed import load_embeddings
    from tests.use.kit import TINY, make_run

    folder = tmp_path / "archive"
    folder.mkdir()
    (folder / "CT_small.dcm").write_bytes(bundled("CT_small.dcm").read_bytes())
    (folder / "MR_small.dcm").write_bytes(bundled("MR_small.dcm").read_bytes())
    write_dicom(folder / "cr.dcm", RAMP, photometric="MONOCHROME1", bits_stored=12)
    write_dicom(folder / "vol.dcm", np.stack([RAMP, RAMP[::-1], RAMP * 0 + 77]), bits_stored=12)
    source = make_run(tmp_path / "rgb")
    monkeypatch.setenv("OPENSEER_DICOM_FRAMES", "all")
    args = ["pretrain", "--data", str(folder), "--recipe", "tiny-cpu", "--init", str(source), "--out",
            str(tmp_path / "ct"), "--max-steps", "2", *TINY, "model.arch=regnety_002", "model.in_chans=1", "data.batch_size=4",
            "data.num_workers=0", "model.compile=false", "data.dicom_frames=all"]
    assert main(args) == 0
    err = capsys.readouterr()
    assert "3 -> 1 input channels" in err.out + err.err
    assert main(["embed", str(tmp_path / "ct"), "--data", str(folder), "--out", str(tmp_path / "emb"), "--quiet",
                 "--dtype", "float32"]) == 0
    arr, index = load_embeddings(tmp_path / "emb")
    assert len(index) == 6 and np.isfinite(arr).all()
