"""Checkpoints: safe loading (no code from pickles), atomic writes, rotation, fallbacks."""

from __future__ import annotations

import os

import pytest
import torch

from openseer.train import checkpoint as ckpt
from openseer.train.checkpoint import (
    CheckpointError,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)


class _Evil:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _state(step: int) -> dict:
    return {"step": step, "model": {"w": torch.full((3,), float(step))}, "config": {"seed": 0}}


def test_a_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoints" / "step_00000001.pt"
    path.parent.mkdir()
    torch.save({"step": 1, "model": _Evil(str(marker))}, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert "refused" in str(e.value)
    assert not marker.exists()  # the command never ran
    # and resuming from such a run refuses too, without running anything
    with pytest.raises(CheckpointError):
        latest_checkpoint(tmp_path)
    assert not marker.exists()


def test_save_is_atomic_and_leaves_no_temporary_file(tmp_path):
    path = save_checkpoint(_state(7), tmp_path, 7, keep=3)
    assert path == checkpoint_path(tmp_path, 7) and path.name == "step_00000007.pt"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000007.pt"]
    back = load_checkpoint(path)
    assert back["step"] == 7 and torch.equal(back["model"]["w"], torch.full((3,), 7.0))


def test_rotation_keeps_the_last_k(tmp_path):
    for step in (10, 20, 30, 40, 50):
        save_checkpoint(_state(step), tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000040.pt", "step_00000050.pt"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000040.pt", "step_00000050.pt"]
    path, state = latest_checkpoint(tmp_path)
    assert path.name == "step_00000050.pt" and state["step"] == 50


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(_state(1), tmp_path, 1, keep=1)

    def disk_full(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(_state(2), tmp_path, 2, keep=1)
    assert "No space left" in str(e.value) and "step_00000001.pt" in str(e.value)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001.pt"]  # no .tmp, old kept
    assert load_checkpoint(checkpoint_path(tmp_path, 1))["step"] == 1


def test_temporary_and_foreign_files_are_never_listed(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "step_00000005.pt.tmp").write_bytes(b"partial")
    (folder / "notes.pt").write_bytes(b"x")
    save_checkpoint(_state(3), tmp_path, 3, keep=5)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003.pt"]


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    save_checkpoint(_state(1), tmp_path, 1, keep=5)
    good = checkpoint_path(tmp_path, 2)
    save_checkpoint(_state(2), tmp_path, 2, keep=5)
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 3])  # truncated by a crash of the storage
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_checkpoint(good)
    path, state = latest_checkpoint(tmp_path)
    assert path.name == "step_00000001.pt" and state["step"] == 1


def test_missing_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        latest_checkpoint(tmp_path)
    (tmp_path / "list.pt").write_bytes(b"")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="dict"):
        load_checkpoint(tmp_path / "list.pt")


# ---------------------------------------------------------------- the queue in checkpoints


def _rows(q) -> list[float]:
    return sorted(q.embeddings[0, :, 0].tolist())


def test_a_queue_saved_before_the_ring_buffer_loads_and_drops_its_oldest_rows_first():
    from openseer.model.swav import SwAVQueue, load_queue

    length = 6
    # the old layout: newest first, shifted every step; row value = its age (0 = newest)
    old = torch.arange(length, dtype=torch.float32).view(1, length, 1).repeat(1, 1, 2)
    q = SwAVQueue(1, length, 2)
    load_queue({"embeddings": old, "filled": length, "world_size": 1}, q, 0, 1, "ckpt")
    assert q.full and _rows(q) == list(range(length))
    q.push_all(torch.full((1, 2, 2), -1.0))  # the old queue would now have dropped ages 4 and 5
    assert _rows(q) == [-1, -1, 0, 1, 2, 3]
    q.push_all(torch.full((1, 3, 2), -2.0))  # and then ages 1, 2 and 3
    assert _rows(q) == [-2, -2, -2, -1, -1, 0]


def test_a_ring_queue_resumes_as_it_was_or_re_dealt_oldest_first_on_another_world_size():
    from openseer.model.swav import SwAVQueue, load_queue

    q = SwAVQueue(1, 4, 1)
    for v in range(1, 7):  # six pushes of one row into four: 3, 4 | 5, 6 with the write position at 2
        q.push_all(torch.full((1, 1, 1), float(v)))
    saved = {"embeddings": q.embeddings.clone(), "filled": 4, "pos": q.write_pos, "world_size": 1}
    same = SwAVQueue(1, 4, 1)
    load_queue(saved, same, 0, 1, "ckpt")
    assert torch.equal(same.embeddings, q.embeddings) and same.write_pos == q.write_pos == 2
    halves = [SwAVQueue(1, 2, 1) for _ in range(2)]
    for rank, h in enumerate(halves):
        load_queue({**saved, "filled": 4}, h, rank, 2, "ckpt")
    assert [h.embeddings[0, :, 0].tolist() for h in halves] == [[3, 4], [5, 6]]  # oldest first, re-dealt
    assert all(h.full and h.write_pos == 0 for h in halves)
