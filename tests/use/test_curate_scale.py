"""curate's index steps as they run at a million images: duplicate links through IVF, k-means trained
on a sample (bench/curate_scale.py measures them at size; here on small sets, against exact)."""

from __future__ import annotations

import numpy as np

from openseer.data.search import choose_links_kind
from openseer.use.curate import cluster, duplicate_groups, kmeans, memory_needed


def _clustered(n: int = 3000, dim: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((20, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(0, 20, n)] + rng.standard_normal((n, dim)).astype(np.float32) * 1.5 / np.sqrt(dim)
    src = rng.choice(n, 200, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(n), src), 200, replace=False)
    x[dst] = x[src] + rng.standard_normal((200, dim)).astype(np.float32) * 0.01
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, np.stack([src, dst], 1)


def test_duplicate_links_through_ivf_group_as_exact_search_does():
    x, pairs = _clustered()
    assert choose_links_kind(1000) == "flat" and choose_links_kind(500_000) == "ivf"
    info: dict = {}
    exact = duplicate_groups(x, 0.95, search="flat")
    approx = duplicate_groups(x, 0.95, search="ivf", info=info)
    assert info["search"] == "ivf"
    assert np.array_equal(exact, approx)
    assert (approx[pairs[:, 0]] == approx[pairs[:, 1]]).all() and approx.max() + 1 == len(x) - len(pairs)


def test_kmeans_trains_on_a_sample_and_assigns_every_row():
    x, _ = _clustered(4000)
    small = cluster(x, 20, seed=1)
    whole = kmeans(x, 20, seed=1)
    assert np.array_equal(small[1], whole[1])  # under the cap: kmeans itself
    cents, assign = cluster(x, 20, seed=1, per_centroid=50)  # 1,000 of the 4,000 rows train it
    assert len(assign) == len(x) and set(assign.tolist()) <= set(range(20))
    sims = x @ cents.T
    assert np.array_equal(assign, sims.argmax(1))  # every row at its nearest centroid
    # the sampled centroids fit the rows about as well as those trained on every row
    assert sims.max(1).mean() >= 0.95 * (x @ whole[0].T).max(1).mean()


def test_the_memory_estimate_grows_linearly_at_a_million():
    one, two = memory_needed(1_000_000, 256, 1000), memory_needed(2_000_000, 256, 1000)
    assert 1.8 < two / one < 2.2
    # by embeddings, beyond exact search: no descriptors and no exhaustive score block; under 8 GiB at 1M
    emb = memory_needed(1_000_000, 256, 1000, dup_by="embedding")
    assert emb < 8 * 2**30 < one
    assert memory_needed(1000, 256, 30, dup_by="embedding") >= 1000 * 1000 * 4  # the block, when exact


def test_curate_reads_the_descriptors_from_the_snapshot_as_from_the_full_check(tmp_path):
    import time

    from openseer.data import index as ix
    from openseer.data.collection import open_collection
    from openseer.use.curate import pile_descriptors
    from tests.data.test_index import _pile

    pile, _ = _pile(tmp_path / "pile")
    ix.build_index(str(pile), progress=False, log=lambda t: None)
    time.sleep(ix.RACY_NS / 1e9 + 0.02)
    ix.open_index(str(pile))
    assert isinstance(ix.open_index(str(pile)), ix.QuickIndex)
    full = ix._open_checked(open_collection(str(pile)))
    rows = [{"key": k} for k in reversed(full.keys)] + [{"key": "not-in-the-index.png"}]
    d, f, w = pile_descriptors(str(pile), rows)
    j = list(reversed(range(len(full.keys))))
    np.testing.assert_array_equal(d[:-1], full.vectors[j])
    np.testing.assert_array_equal(f[:-1], full.flipped[j])
    np.testing.assert_array_equal(w[:-1], full.windows[j])
    assert not d[-1].any() and not f[-1].any() and not w[-1].any()
