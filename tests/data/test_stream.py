"""Streaming tar shards: spec expansion, exactly-once per virtual epoch across 2 ranks x 2 workers,
bit-exact mid-stream resume (also with another worker count), bad samples counted by reason."""

from __future__ import annotations

import io
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from openseer.data.batches import data_state, iterate_batches, prepare_stream
from openseer.data.collection import ShardCollection, open_collection
from openseer.data.decode import DataError
from openseer.data.shards import write_shards
from openseer.data.stream import SlotStream, expand_spec, iter_shard, redeal, slot_shards
from openseer.data.takedown import DenyList, saw_sample
from tests.conftest import tiny_config
from tests.data.corpus import corpus_bytes


def _images(folder: Path, n: int, size: tuple[int, int] = (36, 28)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for i in range(n):
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"im{i:03d}.png")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """8 shards x 6 distinct images, written by the shard writer."""
    root = tmp_path_factory.mktemp("stream")
    _images(root / "in", 48)
    write_shards(root / "in", root / "shards", shard_size=6, workers=1)
    return root / "shards"


def _cfg(*extra: str):
    return tiny_config("crops.sizes=[16,8]", *extra)


def test_spec_forms_expand_to_the_same_shards(shards):
    names = [str(shards / f"{i:06d}.tar") for i in range(8)]
    assert expand_spec(str(shards / "{000000..000007}.tar")) == names
    assert expand_spec(str(shards / "*.tar")) == names
    assert expand_spec(str(shards)) == names
    assert expand_spec(f"{names[0]}::{names[1]}") == names[:2]
    assert expand_spec(f"pipe:cat {shards}/{{000000..000001}}.tar") == [f"pipe:cat {n}" for n in names[:2]]
    with pytest.raises(DataError, match="do not exist"):
        expand_spec(str(shards / "{000000..000009}.tar"))
    src = open_collection(str(shards / "{000000..000007}.tar"))
    assert isinstance(src, ShardCollection) and len(src) == 48  # from index.json
    assert len(open_collection(str(shards / "00000[01].tar"))) == 12
    with pytest.raises(DataError, match="epoch_samples"):
        len(open_collection(f"pipe:cat {shards}/000000.tar"))  # the epoch size is worked out when asked for


def test_every_sample_exactly_once_per_virtual_epoch_across_2_ranks_x_2_workers(shards):
    cfg = _cfg("data.batch_size=6", "data.num_workers=2", "data.shuffle_buffer=4")
    src = open_collection(str(shards), data_cfg=cfg.data)
    all_keys = {r.split(",")[0] for r in (shards / "manifest.csv").read_text().splitlines()[1:]}
    per_epoch = 48 // 6
    seen: list[list[str]] = [[], []]  # per virtual epoch
    for rank in range(2):
        for batch in iterate_batches(src, cfg, rank, 2, 0, 2 * per_epoch):
            assert len(batch.keys) == 3 and batch.crops[0].shape == (3, 3, 16, 16)
            seen[batch.step // per_epoch] += batch.keys
    for epoch in seen:
        assert Counter(epoch) == Counter(all_keys)  # each of the 48 once, none twice
    assert seen[0] != seen[1]  # a new shard order and shuffle each pass


@pytest.mark.parametrize("resume_workers", [0, 2])
def test_mid_stream_resume_neither_repeats_nor_skips(shards, resume_workers):
    cfg = _cfg("data.batch_size=5", "data.num_workers=2", "data.shuffle_buffer=7")
    src = open_collection(str(shards), data_cfg=cfg.data)
    full = list(iterate_batches(src, cfg, 0, 1, 0, 14))  # 70 samples: crosses a pass boundary
    first = iterate_batches(src, cfg, 0, 1, 0, 14)
    head = []
    for batch in first:
        head.append(batch)
        if batch.step == 5:
            break
    state = data_state(first)
    again_cfg = _cfg("data.batch_size=5", f"data.num_workers={resume_workers}", "data.shuffle_buffer=7")
    rest = iterate_batches(open_collection(str(shards), data_cfg=again_cfg.data), again_cfg, 0, 1, 6, 14)
    rest.load_state_dict(state)
    tail = list(rest)
    assert [b.step for b in head + tail] == list(range(14))
    for a, b in zip(full, head + tail):
        assert a.keys == b.keys
        assert all(torch.equal(x, y) for x, y in zip(a.crops, b.crops))  # bit-exact crops too
    first_pass = set()
    for slot in range(2):  # each slot's first pass (24 samples of its 4 shards): no repeat, together all 48
        keys = [k for b in full if b.step % 2 == slot for k in b.keys]
        assert len(set(keys[:24])) == 24
        first_pass |= set(keys[:24])
    assert len(first_pass) == 48


def _read(stream: SlotStream, n: int) -> list[tuple[int, int]]:
    return [(x.url_index, x.position) for x in (next(stream) for _ in range(n))]


def _drain(stream: SlotStream) -> list[tuple[int, int]]:
    """Everything a re-dealt slot delivers before its first sample of the new layout's pass."""
    out = []
    while True:
        x = next(stream)
        if not stream.draining:
            return out
        out.append((x.url_index, x.position))


def _states(layout: dict, states: list, before: dict | None = None) -> dict:
    out = {"layout": layout, "ranks": [[st] for st in states]}
    return {**out, "before": before} if before else out


@pytest.mark.parametrize("reads, n_new", [
    ([5, 30, 13, 0], 2),   # 4 slots -> 2; slots at different passes, one never read
    ([40, 7], 3),          # 2 -> 3 (more slots than the old ones had work for)
    ([25, 25, 26], 1),     # 3 -> 1
])
def test_another_world_size_finishes_every_begun_pass_exactly_once(shards, reads, n_new):
    """Resuming on another world size: the pieces and buffers left by the old slots are re-dealt; when
    the new slots have drained them, every sample has been delivered once per pass begun, and
    ``saw_sample`` (takedown check) agrees with what was delivered at every point."""
    urls, deny = expand_spec(str(shards)), DenyList()
    n_old = len(reads)
    delivered: Counter = Counter()
    old = []
    for slot, n in enumerate(reads):
        stream = SlotStream(urls, 3, slot, n_old, 5, deny)
        delivered.update(_read(stream, n))
        old.append(stream.state() if n else None)
    layout = {"n_urls": 8, "seed": 3, "slots_per_rank": 1, "world_size": n_old}
    new, dealt = redeal(old, 8, 3, n_new)
    last = dealt["first_pass"] - 1
    assert last == max(st["pass"] for st in old if st) >= 1
    before = _states(layout, old)
    streams = [SlotStream(urls, 3, j, n_new, 5, deny, state=new[j]) for j in range(n_new)]
    half = _read(streams[0], 3)  # part of a drain, then a checkpoint of every new slot
    delivered.update(half)
    mid = _states({**layout, "world_size": n_new, **dealt}, [s.state() for s in streams], before)
    everything = [(u, p) for u in range(8) for p in range(6)]
    assert [saw_sample(mid, u, p) for u, p in everything] == [delivered[x] > 0 for x in everything]
    for s in streams:
        delivered.update(_drain(s))
    assert set(delivered.values()) == {last + 1} and len(delivered) == 48  # each sample once per pass
    end = _states({**layout, "world_size": n_new, **dealt}, [s.state() for s in streams], before)
    assert all(saw_sample(end, u, p) for u, p in everything)
    nxt = Counter(x for s in streams for x in _read(s, 11))  # the next pass, on the new layout (>= 12 per slot)
    assert max(nxt.values()) == 1


def test_a_second_world_size_change_during_the_drain(shards):
    """4 -> 2 slots, checkpoint in the middle of the drain, then 2 -> 3: still once per pass."""
    urls, deny = expand_spec(str(shards)), DenyList()
    delivered: Counter = Counter()
    first = [SlotStream(urls, 5, s, 4, 4, deny) for s in range(4)]
    for s, n in zip(first, [20, 3, 14, 9]):
        delivered.update(_read(s, n))
    mid, dealt = redeal([s.state() for s in first], 8, 5, 2)
    second = [SlotStream(urls, 5, j, 2, 4, deny, state=mid[j]) for j in range(2)]
    for s in second:
        delivered.update(_read(s, 4))
    assert all(s.draining for s in second)
    again, dealt2 = redeal([s.state() for s in second], 8, 5, 3)
    assert dealt2["first_pass"] == dealt["first_pass"] + 1  # the pass the drained slots had not begun is finished too
    for j in range(3):
        delivered.update(_drain(SlotStream(urls, 5, j, 3, 4, deny, state=again[j])))
    assert set(delivered.values()) == {dealt2["first_pass"]} and len(delivered) == 48


def test_resume_on_another_world_size_through_the_batch_iterator(shards, capsys):
    """2 ranks x 2 loader slots -> 1 rank: the checkpointed positions of both ranks are re-dealt, the
    old state is kept for takedown checks, and the stream goes on."""
    cfg = _cfg("data.batch_size=6", "data.num_workers=2", "data.shuffle_buffer=4")
    src = open_collection(str(shards), data_cfg=cfg.data)
    ranks, seen = [], Counter()
    for rank in range(2):
        it = iterate_batches(src, cfg, rank, 2, 0, 20)
        for batch in it:
            seen.update(batch.keys)
            if batch.step == 9:
                break
        ranks.append(data_state(it)["ranks"][rank])
    state = {**data_state(it), "ranks": ranks}
    one = _cfg("data.batch_size=6", "data.num_workers=0", "data.shuffle_buffer=4")
    alone = iterate_batches(open_collection(str(shards), data_cfg=one.data), one, 0, 1, 10, 14)
    prepare_stream(alone, "unused", {"data": state}, is_main=False)
    assert "world size changed from 2 to 1" in alone.note and "pass 2 starts" in alone.note
    rest = list(alone)
    assert [b.step for b in rest] == [10, 11, 12, 13] and all(len(b.keys) == 6 for b in rest)
    seen.update(k for b in rest for k in b.keys)
    assert max(seen.values()) == 2  # 60 + 24 deliveries of 48 samples: none a third time
    after = data_state(alone)
    assert after["layout"]["world_size"] == 1 and after["before"]["layout"]["world_size"] == 2
    half = {**state, "ranks": [ranks[0], None]}  # positions of one rank only: cannot be re-dealt
    with pytest.raises(DataError, match="lacks the stream positions of rank"):
        iterate_batches(src, one, 0, 1, 10, 14).load_state_dict(half)


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_bad_samples_in_shards_are_counted_by_reason_and_good_ones_load(tmp_path):
    """Shards made by another tool: the corpus of malformed files, a sample without an image,
    a truncated tar. One pass reports each bad sample once with its reason."""
    bad, good = corpus_bytes()
    bads = [(f"bad{i:02d}.{name.rsplit('.', 1)[-1]}", data) for i, (name, (data, _)) in enumerate(bad.items())]
    goods = [(f"good{i:02d}.{name.rsplit('.', 1)[-1]}", data) for i, (name, (data, _)) in enumerate(good.items())]
    # every shard ends with a good sample, so the pass's last good sample is its last sample
    _tar(tmp_path / "a.tar", bads[:6] + goods[:10])
    _tar(tmp_path / "b.tar", bads[6:] + [("caption_only.txt", b"a sample with no image")] + goods[10:])
    whole = tmp_path / "c_full.tar"
    _tar(whole, [(f"extra{i}.png", good["one_pixel.png"][0] + bytes([i])) for i in range(3)])
    (tmp_path / "c.tar").write_bytes(whole.read_bytes()[:700])  # cut inside the second member
    whole.unlink()
    n_good = len(good)
    cfg = _cfg(f"data.batch_size={n_good + 1}", "data.num_workers=0", "data.epoch_samples=100",
               "data.shuffle_buffer=0")
    src = open_collection(str(tmp_path / "*.tar"), data_cfg=cfg.data)
    it = iterate_batches(src, cfg, 0, 1, 0, 1)
    batch = next(iter(it))
    assert data_state(it)["ranks"][0][0]["pass"] == 0 and not data_state(it)["ranks"][0][0]["buffer"]
    reasons = Counter(r for _, r in batch.bad)
    want = Counter(r for _, r in bad.values())
    want.update({"no_image": 1, "shard_error": 1})
    assert reasons == want
    assert sorted(batch.keys) == sorted([f"good{i:02d}" for i in range(n_good)] + ["extra0"])


def test_slot_stream_state_round_trip_and_deny(shards):
    urls = expand_spec(str(shards))
    mine = slot_shards(len(urls), 3, 0, 1, 2)
    assert sorted(mine + slot_shards(len(urls), 3, 0, 0, 2)) == list(range(8))
    deny = DenyList("x", [])
    s = SlotStream(urls, 3, 1, 2, 5, deny)
    got = [next(s).key for _ in range(9)]
    state = s.state()
    more = [next(s).key for _ in range(20)]
    t = SlotStream(urls, 3, 1, 2, 5, deny, state=state)
    assert [next(t).key for _ in range(20)] == more
    u = SlotStream(urls, 3, 1, 2, 5, DenyList("x", more[:3]), state=state)
    after = [next(u).key for _ in range(17)]
    assert not set(more[:3]) & set(after) and set(after) <= set(more) | set(got)
    assert Counter(r for _, r in u.take_reports()) == {"denied": 3}


def test_a_hanging_or_failing_pipe_ends_its_shard_with_a_counted_error(shards):
    first = str(shards / "000000.tar")
    whole = [s.key for s in iter_shard(first, 0)]
    cases = {
        f"pipe:head -c 3000 {first}; sleep 60": (None, "sent no data for 1 s"),  # part of a tar, then a hang
        "pipe:sleep 60": ([], "sent no data for 1 s"),  # a hang before any byte
        f"pipe:cat {first}; sleep 60": (whole, None),  # a whole tar: read to its end marker, then stopped
        f"pipe:cat {first}; exit 3": (whole, None),
        f"pipe:head -c 3000 {first}; exit 3": (None, "status 3"),  # cut short, then failing
    }
    for url, (keys, message) in cases.items():
        errors: list[str] = []
        t0 = time.perf_counter()
        got = [s.key for s in iter_shard(url, 0, errors, pipe_timeout=1.0)]
        assert time.perf_counter() - t0 < 15, url
        if keys is not None:
            assert got == keys, url
        if message is None:
            assert not errors, (url, errors)
        else:
            assert len(errors) >= 1 and any(message in e for e in errors), (url, errors)
