"""Collections: folders searched recursively (all extensions, subfolders are not labels), Fashion-MNIST,
subsets; reading them: listing, record-file names, bounded time (a real hanging pipe and a real FIFO)."""

from __future__ import annotations

import io
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from openseer.config import ConfigError
from openseer.data.collection import (
    FileCollection,
    SkipCounts,
    TensorCollection,
    list_folder,
    load_fashion_mnist,
    open_collection,
    require_usable,
)
from openseer.data.decode import (
    IMAGE_EXTENSIONS,
    BadImage,
    DataError,
    call_with_timeout,
    decode_bytes,
    load_image,
    read_bytes,
)
from openseer.fileio import name_to_text, read_list, text_to_name, write_list
from tests.conftest import fmnist_available, png_bytes, tiny_config, write_pngs
from tests.data.dicoms import write_dicom

FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP",
           ".tif": "TIFF", ".tiff": "TIFF", ".gif": "GIF", ".jpe": "JPEG", ".jfif": "JPEG", ".dib": "DIB",
           ".ppm": "PPM", ".pgm": "PPM", ".pbm": "PPM", ".pnm": "PPM"}


def _encoded(fmt: str, seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def test_folder_is_searched_recursively_for_every_extension(tmp_path):
    root = tmp_path / "pile"
    expected = set()
    for i, (ext, fmt) in enumerate(sorted(FORMATS.items())):
        sub = root / ("cats" if i % 2 else "dogs") / ("deep" if i % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        for name in (f"a{i}{ext}", f"B{i}{ext.upper()}"):  # extensions are case-insensitive
            (sub / name).write_bytes(_encoded(fmt, i))
            expected.add(str((sub / name).relative_to(root)))
    for name in ("scan.dcm", "deep/SCAN2.DICOM"):  # DICOM is listed with the others, in any case
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write_dicom(root / name, np.arange(120, dtype=np.uint16).reshape(12, 10) * 500)
        expected.add(name)
    (root / "notes.txt").write_text("not an image")
    (root / "dogs" / "readme.md").write_text("not an image")
    assert set(IMAGE_EXTENSIONS) == set(FORMATS) | {".dcm", ".dicom"}

    src = open_collection(str(root))
    keys = [src.key(i) for i in range(len(src))]
    assert set(keys) == expected
    assert keys == sorted(keys)  # stable order
    assert list_folder(root) == sorted(list_folder(root))
    for i in range(len(src)):
        image = src.load(i)
        assert image.mode == "RGB"
        assert image.size == (10, 12)
        assert src.batch_key(i) == keys[i]


def test_subfolders_are_not_labels(tmp_path):
    """Images of all subfolders form one flat unlabelled pile; folder names are only in the keys."""
    write_pngs(tmp_path / "class_a", 3)
    write_pngs(tmp_path / "class_b" / "nested", 2)
    write_pngs(tmp_path, 1, prefix="top")
    src = open_collection(str(tmp_path))
    assert isinstance(src, FileCollection)
    assert len(src) == 6
    assert not hasattr(src, "labels") and not hasattr(src, "classes")
    assert src.load(0).mode == "RGB"  # an image, nothing more: no label travels with it
    assert {src.key(i).split("/")[0] for i in range(len(src))} == {"class_a", "class_b", "top000.png"}


def test_empty_folder_and_missing_path_are_data_errors(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no images found"):
        open_collection(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="does not exist"):
        open_collection(str(tmp_path / "nope"))
    (tmp_path / "file.png").write_bytes(png_bytes(0))
    with pytest.raises(DataError, match="not a folder"):
        open_collection(str(tmp_path / "file.png"))
    with pytest.raises(DataError):
        open_collection("")


def test_bad_files_raise_bad_image_with_a_reason(tmp_path):
    good = png_bytes(1)
    cases = {
        "zero.jpg": (b"", "empty"),
        "text.jpg": (b"<html>this is not a jpeg</html>", "not_an_image"),
        "trunc.png": (good[: len(good) // 2], "truncated"),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(BadImage) as e:
            load_image(tmp_path / name)
        assert e.value.reason == reason, name
    with pytest.raises(BadImage) as e:
        load_image(tmp_path / "missing.png")
    assert e.value.reason == "unreadable"


def test_odd_modes_become_rgb():
    for mode in ("L", "RGBA", "P", "LA", "I;16", "CMYK", "1"):
        img = Image.new(mode, (5, 4))
        buf = io.BytesIO()
        img.save(buf, format="TIFF" if mode in ("I;16", "CMYK") else "PNG")
        out = decode_bytes(buf.getvalue(), mode)
        assert out.mode == "RGB" and out.size == (5, 4), mode


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENSEER_FASHION_MNIST", str(tmp_path))
    with pytest.raises(DataError) as e:
        open_collection("fashion-mnist")
    msg = str(e.value)
    assert str(tmp_path) in msg
    assert "apt-get install" in msg and "--data" in msg


def test_subset_keeps_the_first_images():
    images = torch.arange(10 * 4, dtype=torch.uint8).view(10, 1, 2, 2)
    src = TensorCollection(images, "t")
    sub = src.head(4)
    assert len(sub) == 4 and sub.in_memory
    assert torch.equal(sub.images, images[:4])
    assert [sub.batch_key(i) for i in range(4)] == ["t:0", "t:1", "t:2", "t:3"]
    assert [sub.key(i) for i in range(4)] == ["t:train:0", "t:train:1", "t:train:2", "t:train:3"]
    picked = src.subset([7, 2])  # any rows: keys still name the rows of the whole tensor
    assert [picked.key(i) for i in range(2)] == ["t:train:7", "t:train:2"] and picked.batch_key(0) == "t:7"
    assert torch.equal(picked.images, images[[7, 2]])


@fmnist_available
def test_fashion_mnist_loads():
    images, labels = load_fashion_mnist("train")
    assert images.shape == (60000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and set(labels.unique().tolist()) == set(range(10))
    test_images, _ = load_fashion_mnist("test")
    assert test_images.shape == (10000, 1, 28, 28)
    src = open_collection("fashion-mnist", limit=100)
    assert len(src) == 100 and src.in_memory
    assert torch.equal(src.images, images[:100])


# ---------------------------------------------------------------- reading: names and bounded time

NAMES = ["plain.jpg", "new\nline.png", "comma,\"quote\".png", "-leading-dash.jpg", "back\\slash\\n.png",
         "#hash.png", " space.png", "tab\t.png", "x" * 250 + ".png", os.fsdecode(b"lat\xe9\xff.png"), "ünï.png"]


def test_every_name_round_trips_through_record_files_and_opens_the_file(tmp_path):
    for i, name in enumerate(NAMES):
        (tmp_path / name).write_bytes(png_bytes(i))
        text = name_to_text(name)
        assert text_to_name(text) == name and "\n" not in text and text.encode("utf-8")
    listing = tmp_path / "list.txt"
    write_list(listing, NAMES)
    assert read_list(listing) == NAMES
    coll = open_collection(str(listing))
    assert [e.name for e in coll.entries] == NAMES
    assert all(it.ok for it in coll.items())  # every written name opens its file again


def test_a_plain_list_a_person_wrote_is_read_as_is(tmp_path):
    (tmp_path / "a b.png").write_bytes(png_bytes(1))
    (tmp_path / "c.png").write_bytes(png_bytes(2))
    (tmp_path / "paths.txt").write_bytes(b"# my images\n\na b.png\r\n" + str(tmp_path / "c.png").encode() + b"\n")
    coll = open_collection(str(tmp_path / "paths.txt"))
    assert [e.name for e in coll.entries] == ["a b.png", str(tmp_path / "c.png")]
    assert all(it.ok for it in coll.items())


def test_a_hanging_pipe_shard_is_given_up_counted_and_the_run_goes_on(tmp_path):
    coll = open_collection("pipe:sleep 1000", pipe_timeout=1.5)
    skips = SkipCounts()
    t0 = time.monotonic()
    items = list(coll.items(skips=skips))
    assert time.monotonic() - t0 < 6
    assert [it.reason for it in items] == ["shard_error"] and "no data for 1.5 s" in items[0].detail
    with pytest.raises(DataError, match="no usable image in pipe:sleep 1000"):
        require_usable(coll, skips)


def test_a_fifo_never_blocks_a_read_and_a_blocking_read_is_bounded(tmp_path, monkeypatch):
    fifo = tmp_path / "stuck.jpg"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(BadImage) as e:
        read_bytes(fifo, timeout=30)
    assert e.value.reason == "not_a_file" and time.monotonic() - t0 < 1  # refused before opening
    # a read that blocks for real (opening a FIFO without a writer), bounded by the timeout
    t0 = time.monotonic()
    with pytest.raises(BadImage) as e:
        call_with_timeout(lambda: open(fifo, "rb").read(), 1.0, str(fifo))
    assert e.value.reason == "timeout" and 0.9 < time.monotonic() - t0 < 4
    # the same inside a collection: the stuck file is counted, the next one is read
    (tmp_path / "z_good.png").write_bytes(png_bytes(3))
    import openseer.data.decode as decode

    real = decode.read_file
    monkeypatch.setattr(decode, "read_file", lambda p: open(p, "rb").read() if str(p).endswith("stuck.jpg")
                        else real(p))
    coll = open_collection(str(tmp_path), read_timeout=1.0)
    skips = SkipCounts()
    t0 = time.monotonic()
    got = [(it.key, it.reason) for it in coll.items(skips=skips)]
    assert got == [("stuck.jpg", "timeout"), ("z_good.png", "")] and time.monotonic() - t0 < 5
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # release the two stuck reader threads
    os.close(fd)


def test_the_read_timeout_is_a_config_key_and_an_environment_override(tmp_path, monkeypatch):
    assert tiny_config("data.read_timeout=5").data.read_timeout == 5
    with pytest.raises(ConfigError, match="data.read_timeout"):
        tiny_config("data.read_timeout=0")
    (tmp_path / "a.png").write_bytes(png_bytes(1))
    monkeypatch.setenv("OPENSEER_READ_TIMEOUT", "7")
    assert open_collection(str(tmp_path)).read_timeout == 7
    monkeypatch.setenv("OPENSEER_READ_TIMEOUT", "soon")
    with pytest.raises(DataError, match="OPENSEER_READ_TIMEOUT"):
        open_collection(str(tmp_path))


def test_missing_and_empty_collections_are_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_collection(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.jpg").mkdir()  # a folder named like an image is a folder
    with pytest.raises(DataError, match="no images found"):
        open_collection(str(tmp_path / "empty"))


# ---------------------------------------------------------------- one type, three ways to read it


def test_every_kind_reads_the_same_rows_by_stream_random_access_and_chunks(tmp_path):
    """Folder, shards and tensors: the stream, random access and the chunks agree on the rows, and the
    deny-list and skip counts are the same in each."""
    from openseer.data.denylist import content_key
    from openseer.data.shards import write_shards

    paths = write_pngs(tmp_path / "pile", 6)
    (tmp_path / "pile" / "img_bad.png").write_bytes(b"not a png")
    write_shards(tmp_path / "pile", tmp_path / "shards", shard_size=3)
    denied = content_key(paths[2].read_bytes())
    (tmp_path / "pile" / "takedowns.txt").write_text(denied + "\n")
    (tmp_path / "shards" / "takedowns.txt").write_text(denied + "\n")
    images = torch.arange(5 * 4, dtype=torch.uint8).view(5, 1, 2, 2)
    for coll in (open_collection(str(tmp_path / "pile"), chunk_size=4), open_collection(str(tmp_path / "shards")),
                 TensorCollection(images, "t")):
        skips = SkipCounts()
        streamed = [(it.key, it.reason) for it in coll.items(skips=skips)]
        chunked = [(key, item if isinstance(item, str) else "") for chunk in coll.chunks
                   for _, key, _, item in coll.read_chunk(chunk)]
        assert [k for k, _ in streamed] == [k for k, _ in chunked], coll.kind
        assert [r.split(":")[0] for _, r in streamed] == [r.split(":")[0] for _, r in chunked], coll.kind
        assert coll.n == len(streamed) == sum(c.stop - c.start for c in coll.chunks)
        if coll.kind == "memory":
            assert skips.skipped == 0 and skips.read == 5
            assert all(torch.equal(coll[i], images[i]) for i in range(5))
            continue
        # the shard writer leaves the undecodable file out; the deny-list applies in both
        assert skips.by_reason() == ({"denied": 1, "not_an_image": 1} if coll.kind == "files" else {"denied": 1})
        assert coll.fingerprint() == coll.fingerprint()
        if coll.kind == "files":
            assert len(coll.chunks) == 2 and [coll.key(i) for i in range(len(coll))] == [k for k, _ in streamed]
            for i, (_, reason) in enumerate(streamed):
                if reason:
                    with pytest.raises(BadImage) as e:
                        coll.load(i)
                    assert e.value.reason == reason
                else:
                    assert coll[i].mode == "RGB"
        else:
            with pytest.raises(DataError, match="stream"):
                coll.load(0)
