"""Batches: a seeded, reproducible order; rank slices; bad files skipped and counted; resumable."""

from __future__ import annotations

import pytest
import torch

from openseer.data.batches import count_reasons, epoch_permutation, iterate_batches, step_indices
from openseer.data.collection import TensorCollection, open_collection
from openseer.data.decode import DataError
from tests.conftest import png_bytes, tiny_config, write_pngs


def test_step_indices_rank_slices_are_disjoint_and_make_up_the_global_batch():
    n, gb, world, seed = 100, 24, 4, 3
    seen = []
    for step in range(4 * 2):  # 4 steps per epoch, two epochs
        whole = step_indices(step, n, gb, 0, 1, seed)
        parts = [step_indices(step, n, gb, r, world, seed) for r in range(world)]
        assert all(len(p) == gb // world for p in parts)
        flat = [i for p in parts for i in p]
        assert len(set(flat)) == gb  # disjoint
        assert flat == whole  # rank order concatenated = the global batch
        if step < 4:
            seen += whole
    # within one epoch no image repeats, and the dropped tail is the only thing missing
    assert len(set(seen)) == 4 * gb
    assert set(seen) <= set(range(n))


def test_order_is_seeded_and_reproducible():
    a = [step_indices(s, 50, 10, 0, 1, seed=1) for s in range(10)]
    b = [step_indices(s, 50, 10, 0, 1, seed=1) for s in range(10)]
    c = [step_indices(s, 50, 10, 0, 1, seed=2) for s in range(10)]
    assert a == b
    assert a != c
    assert a[:5] != a[5:]  # a new permutation each epoch
    assert not torch.equal(epoch_permutation(50, 1, 0), epoch_permutation(50, 1, 1))
    # a cache (as the loaders use) changes nothing
    cache: dict = {}
    assert [step_indices(s, 50, 10, 0, 1, seed=1, _cache=cache) for s in range(10)] == a


def test_fewer_images_than_a_batch_is_a_clear_error():
    with pytest.raises(DataError, match="fewer than one global batch"):
        step_indices(0, 5, 8, 0, 1, 0)


def _in_memory_source(n: int = 40) -> TensorCollection:
    g = torch.Generator().manual_seed(0)
    return TensorCollection(torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g), "rand")


def test_in_memory_batches_depend_only_on_the_step():
    """Starting at step 3 gives exactly the batch the uninterrupted iterator gives at step 3 (resume)."""
    cfg = tiny_config("data.batch_size=8")
    src = _in_memory_source()
    full = list(iterate_batches(src, cfg, 0, 1, 0, 6))
    assert [b.step for b in full] == list(range(6))
    late = list(iterate_batches(src, cfg, 0, 1, 3, 6))
    for a, b in zip(full[3:], late):
        assert a.keys == b.keys
        assert all(torch.equal(x, y) for x, y in zip(a.crops, b.crops))
    # crops: counts and sizes of the plan, RGB, per-rank batch
    assert [tuple(c.shape) for c in full[0].crops] == [(8, 3, 24, 24)] * 2 + [(8, 3, 12, 12)] * 2
    # two ranks split the global batch
    r0 = next(iterate_batches(src, cfg, 0, 2, 0, 1))
    r1 = next(iterate_batches(src, cfg, 1, 2, 0, 1))
    assert r0.keys + r1.keys == full[0].keys
    with pytest.raises(DataError, match="divisible"):
        next(iterate_batches(src, cfg, 0, 3, 0, 1))


def _bad_folder(tmp_path):
    """10 good PNGs and three bad files, each between good ones in the sorted order."""
    folder = tmp_path / "mixed"
    write_pngs(folder, 10, prefix="a")
    (folder / "a002_zero.jpg").write_bytes(b"")
    (folder / "a005_text.jpg").write_text("GIF89a? no, just some text saved as .jpg\n")
    good = png_bytes(99)
    (folder / "a008_trunc.png").write_bytes(good[: len(good) // 2])
    return folder


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_are_skipped_and_counted_by_reason(tmp_path, workers):
    folder = _bad_folder(tmp_path)
    src = open_collection(str(folder))
    assert len(src) == 13
    cfg = tiny_config("data.batch_size=13", f"data.num_workers={workers}")
    batches = list(iterate_batches(src, cfg, 0, 1, 0, 2))  # two epochs of one step each
    bad = [b for batch in batches for b in batch.bad]
    assert count_reasons(bad) == {"empty": 2, "not_an_image": 2, "truncated": 2}
    assert {key for key, _ in bad} == {"a002_zero.jpg", "a005_text.jpg", "a008_trunc.png"}
    for batch in batches:
        assert len(batch.keys) == 13  # every slot filled with a good image
        assert all(k.endswith(".png") and "trunc" not in k for k in batch.keys)
        assert all(c.shape[0] == 13 and torch.isfinite(c).all() for c in batch.crops)


def test_decoded_batches_do_not_depend_on_the_number_of_workers(tmp_path):
    folder = tmp_path / "pngs"
    write_pngs(folder, 8)
    src = open_collection(str(folder))
    out = []
    for workers in (0, 2):
        cfg = tiny_config("data.batch_size=4", f"data.num_workers={workers}")
        out.append(list(iterate_batches(src, cfg, 0, 1, 1, 3)))
    for a, b in zip(*out):
        assert a.step == b.step and a.keys == b.keys
        assert all(torch.equal(x, y) for x, y in zip(a.crops, b.crops))


def test_a_folder_of_only_bad_files_stops_with_a_data_error(tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    for i in range(70):
        (folder / f"x{i:03d}.jpg").write_text("not an image")
    cfg = tiny_config("data.batch_size=2")
    with pytest.raises(DataError, match="unreadable images in a row"):
        next(iterate_batches(open_collection(str(folder)), cfg, 0, 1, 0, 1))
