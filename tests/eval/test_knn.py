"""Weighted kNN on hand-made features with known answers."""

from __future__ import annotations

import math

import numpy as np
import torch

from openseer.eval.knn import knn_eval, knn_predict, knn_topk


def test_knn_known_answer():
    # bank: two clusters on the unit circle; queries near each cluster
    bank = np.array([[1, 0], [0.9, 0.1], [0.95, -0.05], [0, 1], [0.1, 0.9]], dtype=np.float32)
    labels = np.array([0, 0, 0, 1, 1])
    queries = np.array([[1, 0.02], [0.02, 1]], dtype=np.float32)
    res = knn_eval(bank, labels, queries, np.array([0, 1]), n_classes=2, ks=(1, 3))
    assert [r["top1"] for r in res] == [100.0, 100.0]
    assert [r["k"] for r in res] == [1, 3]


def test_knn_weighting_by_temperature():
    # k=3: one very close neighbour of class 1 against two far ones of class 0.
    bank = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=np.float32)
    labels = np.array([1, 0, 0])
    q = np.array([[1.0, 0.2]], dtype=np.float32)
    # sims: 0.98 to class 1, 0.196 twice to class 0. With T=0.07 the close one wins;
    # with a huge T the votes are nearly equal and the majority (class 0) wins.
    assert knn_predict(bank, labels, q, 2, ks=(3,), temperature=0.07)[3][0, 0] == 1
    assert knn_predict(bank, labels, q, 2, ks=(3,), temperature=1e6)[3][0, 0] == 0
    s1 = 1.0 / math.sqrt(1.04)
    s0 = 0.2 / math.sqrt(1.04)
    assert math.exp(s1 / 0.07) > 2 * math.exp(s0 / 0.07)


def test_chunking_does_not_change_the_answer():
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(500, 16, generator=g).numpy()
    queries = torch.randn(70, 16, generator=g).numpy()
    s_a, i_a = knn_topk(bank, queries, 10)
    s_b, i_b = knn_topk(bank, queries, 10, query_chunk=7, bank_chunk=33)
    assert torch.allclose(s_a, s_b, atol=1e-6)
    assert torch.equal(i_a, i_b)
    labels = np.arange(500) % 5
    a = knn_predict(bank, labels, queries, 5, ks=(5, 20))
    b = knn_predict(bank, labels, queries, 5, ks=(5, 20), query_chunk=9, bank_chunk=50)
    assert all(torch.equal(a[k], b[k]) for k in (5, 20))


def test_k_larger_than_the_bank_is_capped():
    bank = np.eye(3, dtype=np.float32)
    res = knn_eval(bank, np.array([0, 1, 2]), bank, np.array([0, 1, 2]), 3, ks=(200,))
    assert res[0]["k_used"] == 3 and res[0]["top1"] == 100.0
