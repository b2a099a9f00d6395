"""Reading a collection: listing, record-file names, bounded time (a real hanging pipe and a real FIFO)."""

from __future__ import annotations

import os
import time

import pytest

from openseer.config import ConfigError
from openseer.data.collection import SkipCounts, open_collection, require_usable
from openseer.data.decode import BadImage, DataError, call_with_timeout, read_bytes
from openseer.fileio import name_to_text, read_list, text_to_name, write_list
from tests.conftest import png_bytes, tiny_config

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
