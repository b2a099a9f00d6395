"""atomic_write_text / atomic_write_json: the whole new text or the old file, never a mix, and no leftovers."""

from __future__ import annotations

import json
import os

import pytest

from openseer.fileio import atomic_write_json, atomic_write_text


def test_atomic_write_replaces_the_whole_file_and_leaves_nothing_beside_it(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old and longer than the new text\n")
    atomic_write_text(path, "névé\n")
    assert path.read_bytes() == "névé\n".encode()  # UTF-8, no newline translation
    assert os.listdir(tmp_path) == ["state.json"]


def test_a_failed_atomic_write_keeps_the_target_and_removes_its_temporary(tmp_path):
    target = tmp_path / "a_directory"
    target.mkdir()
    (target / "inside").write_text("kept")
    with pytest.raises(OSError):
        atomic_write_text(target, "text")  # a file cannot be renamed over a directory
    assert sorted(os.listdir(tmp_path)) == ["a_directory"] and (target / "inside").read_text() == "kept"


def test_atomic_json_round_trips(tmp_path):
    path = tmp_path / "progress.json"
    atomic_write_json(path, {"next_input": 3, "shards": ["000000.tar"]})
    assert json.loads(path.read_text()) == {"next_input": 3, "shards": ["000000.tar"]}
    assert os.listdir(tmp_path) == ["progress.json"]
