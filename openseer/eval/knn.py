"""Weighted kNN on frozen features (docs/method.md §6): cosine similarity, votes exp(sim / T), T = 0.07.

Several k are scored from one top-k search. Memory stays bounded for large banks: queries are taken
in chunks, and the bank (which may be a memory-mapped array) is streamed in chunks too, keeping a
running top-k per query; the largest temporary is ``query_chunk x bank_chunk`` similarities.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_KS = (10, 20, 100, 200)
TEMPERATURE = 0.07


def _rows(x: np.ndarray | torch.Tensor, start: int, stop: int, device: torch.device) -> torch.Tensor:
    t = x[start:stop] if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x[start:stop], dtype=np.float32))
    return F.normalize(t.to(device, torch.float32), dim=1)


def knn_topk(bank: np.ndarray | torch.Tensor, queries: np.ndarray | torch.Tensor, k: int,
             query_chunk: int = 1024, bank_chunk: int = 65536,
             device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, bank indices), each (n_queries, k), of the k most cosine-similar bank rows."""
    device = torch.device(device)
    n_bank, n_q = len(bank), len(queries)
    k = min(k, n_bank)
    sims_out = torch.empty(n_q, k)
    idx_out = torch.empty(n_q, k, dtype=torch.long)
    for qs in range(0, n_q, query_chunk):
        q = _rows(queries, qs, qs + query_chunk, device)
        best_s = torch.full((len(q), 0), -2.0, device=device)
        best_i = torch.zeros((len(q), 0), dtype=torch.long, device=device)
        for bs in range(0, n_bank, bank_chunk):
            b = _rows(bank, bs, bs + bank_chunk, device)
            s, i = (q @ b.t()).topk(min(k, len(b)), dim=1)
            best_s, pos = torch.cat([best_s, s], 1).topk(min(k, best_s.shape[1] + s.shape[1]), dim=1)
            best_i = torch.cat([best_i, i + bs], 1).gather(1, pos)
        sims_out[qs:qs + len(q)] = best_s.cpu()
        idx_out[qs:qs + len(q)] = best_i.cpu()
    return sims_out, idx_out


def knn_predict(bank: np.ndarray | torch.Tensor, bank_labels: np.ndarray, queries: np.ndarray | torch.Tensor,
                n_classes: int, ks: tuple[int, ...] = DEFAULT_KS, temperature: float = TEMPERATURE, top: int = 5,
                query_chunk: int = 1024, bank_chunk: int = 65536,
                device: str | torch.device = "cpu") -> dict[int, torch.Tensor]:
    """For each k, the ``top`` best classes per query (n_queries, top), ranked by the sum of
    exp(sim / T) over the k nearest neighbours. Only these rankings are kept, never all scores."""
    labels = torch.as_tensor(np.asarray(bank_labels), dtype=torch.long)
    top = min(top, n_classes)
    out: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for qs in range(0, len(queries), query_chunk):
        sims, idx = knn_topk(bank, queries[qs:qs + query_chunk], max(ks), query_chunk, bank_chunk, device)
        neighbour_labels = labels[idx]
        weights = (sims / temperature).exp()
        for k in ks:
            kk = min(k, sims.shape[1])
            scores = torch.zeros(len(sims), n_classes)
            scores.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
            out[k].append(scores.topk(top, dim=1).indices)
    return {k: torch.cat(v) for k, v in out.items()}


def ranked_accuracy(ranked: torch.Tensor, labels: np.ndarray | torch.Tensor,
                    ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Top-k accuracy in percent from ranked predictions (n, >= k); k capped at the columns there are."""
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    hits = ranked == y[:, None]
    return [100.0 * float(hits[:, :min(k, ranked.shape[1])].any(1).float().mean()) for k in ks]


def topk_accuracy(scores: torch.Tensor, labels: np.ndarray | torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Top-k accuracy in percent for each k from class scores (k capped at the number of classes)."""
    return ranked_accuracy(scores.topk(min(max(ks), scores.shape[1]), dim=1).indices, labels, ks)


def knn_eval(train_x: np.ndarray | torch.Tensor, train_y: np.ndarray, test_x: np.ndarray | torch.Tensor,
             test_y: np.ndarray, n_classes: int, ks: tuple[int, ...] = DEFAULT_KS,
             temperature: float = TEMPERATURE, device: str | torch.device = "cpu") -> list[dict]:
    """One result per k: top-1/top-5 in percent, the k actually used and the temperature."""
    ranked = knn_predict(train_x, train_y, test_x, n_classes, ks, temperature, device=device)
    results = []
    for k in ks:
        top1, top5 = ranked_accuracy(ranked[k], test_y)
        results.append({"top1": top1, "top5": top5, "k": k, "k_used": min(k, len(train_x)),
                        "temperature": temperature, "similarity": "cosine", "vote": "sum exp(sim/T)"})
    return results
