"""``openseer shard`` writes each shard's part of the pile index as it writes the shard: the same
files ``openseer index`` on the shards writes, so that indexing them afterwards has nothing to do."""

from __future__ import annotations

import json
import shutil

import pytest

from openseer.data import index as ix
from openseer.data.shards import write_shards
from tests.data.test_index import _pile
from tests.data.test_nearcopy import photo


@pytest.mark.parametrize("workers", [1, 2])
def test_shard_writes_the_index_openseer_index_writes(tmp_path, workers):
    src, names = _pile(tmp_path / "src")
    shards = tmp_path / "shards"
    write_shards(src, shards, shard_size=5, workers=workers)
    r = ix.build_index(str(shards), progress=False, log=lambda t: None)
    assert r["described"] == 0 and r["kept"] == r["rows"] == len(names) + 8 + 1  # nothing left to do
    assert len(ix.open_index(str(shards)).copies_of(photo(11))) == len(names)
    by_shard = tmp_path / "by_shard"
    shutil.copytree(shards / ix.INDEX_DIR, by_shard)
    shutil.rmtree(shards / ix.INDEX_DIR)
    assert ix.build_index(str(shards), progress=False, log=lambda t: None)["described"] == r["rows"]
    a, b = (json.loads((d / ix.MANIFEST).read_text()) for d in (by_shard, shards / ix.INDEX_DIR))
    a.pop("updated_utc"), b.pop("updated_utc")
    assert a == b and len(a["parts"]) == 4
    files = sorted(p.name for p in (by_shard / "parts").iterdir())
    assert files == sorted(p.name for p in (shards / ix.INDEX_DIR / "parts").iterdir())
    for name in files:
        assert (by_shard / "parts" / name).read_bytes() == (shards / ix.INDEX_DIR / "parts" / name).read_bytes(), name


def test_shard_without_the_index(tmp_path):
    src, _ = _pile(tmp_path / "src")
    write_shards(src, tmp_path / "shards", shard_size=5, workers=1, index=False)
    assert not (tmp_path / "shards" / ix.INDEX_DIR).exists()
