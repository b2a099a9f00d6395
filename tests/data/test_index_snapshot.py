"""The index snapshot a takedown opens: the checked index without listing the pile, dropped for the
full check as soon as anything it watched changed; the range search's approximate index kept on disk."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from openseer.data import index as ix
from openseer.data import index as snap  # the snapshot: QuickIndex, RACY_NS
from openseer.data import nearcopy as nc
from openseer.data import search
from openseer.data.collection import open_collection
from tests.data.test_index import _pile, _png
from tests.data.test_nearcopy import photo


def _open_twice(spec: str) -> None:
    time.sleep(snap.RACY_NS / 1e9 + 0.02)  # a folder written within RACY_NS of a snapshot: not trusted
    assert ix.open_index(spec) is not None  # (a full check where the snapshot was racy: it keeps a new one)


def _same(quick, full) -> None:
    assert list(quick.keys) == list(full.keys) and list(quick.paths) == list(full.paths)
    assert list(quick.content_keys) == list(full.content_keys) and quick.skipped == full.skipped
    for name in ("vectors", "flipped", "windows", "pixels", "nbytes"):
        np.testing.assert_array_equal(np.asarray(getattr(quick, name)), np.asarray(getattr(full, name)), name)
    assert [tuple(x) for x in quick.loc] == [tuple(map(lambda v: v if isinstance(v, int) else os.fspath(v), x))
                                            for x in full.loc]


def test_a_takedown_opens_the_snapshot_without_listing_the_pile(tmp_path, monkeypatch):
    pile, names = _pile(tmp_path / "pile")
    (pile / "sub").mkdir()
    (pile / "sub" / "deep.png").write_bytes(_png(photo(40)))
    ix.build_index(str(pile), progress=False, log=lambda t: None)
    _open_twice(str(pile))
    full = ix._open_checked(open_collection(str(pile)))

    def no_listing(*a, **k):
        raise AssertionError("the pile was listed")

    monkeypatch.setattr(ix, "open_collection", no_listing)
    quick = ix.open_index(str(pile))
    assert isinstance(quick, snap.QuickIndex)
    _same(quick, full)
    target = photo(11)
    assert quick.copies_of(target) == full.copies_of(target) and len(quick.copies_of(target)) == len(names)
    monkeypatch.undo()
    # each change the snapshot watches sends open_index back to the full check, which names it
    (pile / "sub" / "new.png").write_bytes(_png(photo(41)))  # added in a sub-folder
    with pytest.raises(ix.IndexMismatch, match=r"1 not indexed \(sub/new.png\)"):
        ix.open_index(str(pile))
    (pile / "sub" / "new.png").unlink()
    _open_twice(str(pile))
    os.rename(pile / "x3.png", tmp_path / "x3.png")  # removed
    with pytest.raises(ix.IndexMismatch, match=r"1 gone \(x3.png\)"):
        ix.open_index(str(pile))
    os.rename(tmp_path / "x3.png", pile / "x3.png")
    _open_twice(str(pile))
    assert isinstance(ix.open_index(str(pile)), snap.QuickIndex)
    folder = pile / ix.INDEX_DIR
    ix._save_manifest(folder, ix._load_manifest(folder))  # the manifest rewritten (as `openseer index` does)
    assert not isinstance(ix.open_index(str(pile)), snap.QuickIndex)
    ix.build_index(str(pile), rebuild=True, progress=False, log=lambda t: None)  # keeps a snapshot of its own
    assert isinstance(ix.open_index(str(pile)), snap.QuickIndex)
    monkeypatch.setattr(ix, "DESCRIPTOR_VERSION", "other.v9")  # another descriptor version
    with pytest.raises(ix.IndexMismatch, match="version"):
        ix.open_index(str(pile))


def test_a_changed_file_list_is_checked_in_full(tmp_path):
    pile, names = _pile(tmp_path / "pile")
    lst = tmp_path / "pile" / "list.txt"
    lst.write_text("".join(f"{n}\n" for n in names))
    ix.build_index(str(lst), progress=False, log=lambda t: None)
    _open_twice(str(lst))
    assert isinstance(ix.open_index(str(lst)), snap.QuickIndex)
    lst.write_text("".join(f"{n}\n" for n in [*names, "x0.png"]))
    with pytest.raises(ix.IndexMismatch, match=r"1 not indexed \(x0.png\)"):
        ix.open_index(str(lst))


def test_the_takedown_search_structure_is_kept_on_disk_and_answers_as_exact_search(tmp_path, monkeypatch):
    pile, names = _pile(tmp_path / "pile", others=12)
    monkeypatch.setattr(search, "RANGE_EXACT_MAX", 5)  # an approximate range search from 5 vectors
    ix.build_index(str(pile), progress=False, log=lambda t: None)
    _open_twice(str(pile))
    quick = ix.open_index(str(pile))
    assert isinstance(quick, snap.QuickIndex) and quick.index.search.kind == "ivf"
    assert (quick.snapshot / "search.faiss").is_file()
    full = ix._open_checked(open_collection(str(pile)))
    _same(quick, full)  # the vectors read back from the parts (the search index holds them)
    assert not (quick.snapshot / "vectors.npy").exists()
    full.index = nc.CopyIndex(full.vectors, kind="flat")  # exact search, for the answer to compare with
    target = photo(11)
    assert quick.copies_of(target) == full.copies_of(target) and len(full.copies_of(target)) == len(names)
