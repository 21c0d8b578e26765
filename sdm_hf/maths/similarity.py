"""Similarity ``q`` and the nearest-neighbour distance ``d_nearest`` from a search of the support set.

Reference: Schmaltz (2025), Similarity-Distance-Magnitude Activations, arXiv:2509.12760 (the Similarity term).

``q`` = length of the unbroken run of nearest support rows (by L2 distance, ties by row index) with
``label == predicted == y_hat(query)``, capped at ``max_q``; ``q = 0`` marks the query out of distribution. A query
that is itself a support row skips that row (by index). The search is any :class:`NeighborSearcher`
(``sdm_hf.search.index.SupportIndex`` in practice). Derivation and the adaptive search: docs/how_sdm_works.md,
section 'Similarity q'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = [
    "NeighborSearcher",
    "SimilarityResult",
    "similarity_from_neighbors",
    "compute_similarity",
    "dense_similarity",
]


class NeighborSearcher(Protocol):
    """What :func:`compute_similarity` needs from a neighbour index."""

    @property
    def ntotal(self) -> int: ...

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, D]`` queries -> (``[B, k]`` squared L2 distances, ``[B, k]`` int64 rows), by (distance, row)."""
        ...

    def pair_distances(self, queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``[B]`` exact squared L2 distances from ``queries[i]`` (``[B, D]``) to row ``rows[i]`` (``[B]`` int64)."""
        ...


@dataclass
class SimilarityResult:
    """Output of :func:`compute_similarity` and :func:`dense_similarity`: ``[B]`` CPU tensors.

    Attributes:
        q: int64 similarity, capped at ``max_q``.
        nearest_index: int64 row of the nearest support exemplar, own row excluded (-1: none).
        d_nearest: float32 squared L2 distance to that exemplar (``inf`` when none).
        searched_k: int64 neighbours finally searched for the row (diagnostics).
    """

    q: torch.Tensor
    nearest_index: torch.Tensor
    d_nearest: torch.Tensor
    searched_k: torch.Tensor


def similarity_from_neighbors(
    neighbor_indices: torch.Tensor,
    query_prediction: torch.Tensor,
    support_labels: torch.Tensor,
    support_predictions: torch.Tensor,
    self_index: torch.Tensor | None = None,
    max_q: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run length ``q`` over given neighbour lists (Schmaltz 2025, arXiv:2509.12760, the Similarity term).

    Args:
        neighbor_indices: ``[B, k]`` int support rows in ascending distance; -1 marks "no row".
        query_prediction: ``[B]`` int predicted class of each query.
        support_labels, support_predictions: ``[N]`` int true and predicted labels of the support rows.
        self_index: ``[B]`` each query's own support row (skipped), -1 or None for none.
        max_q: optional cap on ``q``.

    Returns:
        ``(q, nearest, resolved)``, each ``[B]``: int64 run length, int64 nearest row (-1: none), and bool
        ``resolved`` (a failing neighbour or the cap was reached: searching wider cannot change ``q``).
    """
    idx = neighbor_indices.long()
    batch, k = idx.shape
    present = idx >= 0
    if self_index is not None:
        present &= idx != self_index.long().view(-1, 1)
    safe = idx.clamp(min=0)
    labels = support_labels.long()[safe]
    preds = support_predictions.long()[safe]
    ok = present & (labels == preds) & (preds == query_prediction.long().view(-1, 1))
    fail = present & ~ok
    positions = torch.arange(k, device=idx.device).expand(batch, k)
    big = torch.full_like(positions, k)
    first_fail = torch.where(fail, positions, big).min(dim=1).values
    q = (ok & (positions < first_fail.view(-1, 1))).sum(dim=1)
    resolved = first_fail < k
    if max_q is not None:
        resolved |= q >= max_q
        q = q.clamp(max=max_q)
    first_present = torch.where(present, positions, big).min(dim=1).values
    nearest = torch.where(
        first_present < k,
        idx.gather(1, first_present.clamp(max=k - 1).view(-1, 1)).squeeze(1),
        torch.full_like(first_present, -1),
    )
    return q, nearest, resolved


def compute_similarity(
    searcher: NeighborSearcher,
    queries: torch.Tensor,
    query_prediction: torch.Tensor,
    support_labels: torch.Tensor,
    support_predictions: torch.Tensor,
    self_index: torch.Tensor | None = None,
    max_q: int = 2048,
    initial_k: int | torch.Tensor = 32,
    growth: int = 4,
) -> SimilarityResult:
    """``q``, nearest row and ``d_nearest`` for a batch, searching ``initial_k`` neighbours and widening only rows
    whose run reached the end of the search (Schmaltz 2025, arXiv:2509.12760, the Similarity term).

    Args:
        searcher: the support index.
        queries: ``[B, D]`` float vectors in the searcher's space.
        query_prediction: ``[B]`` int predicted classes.
        support_labels, support_predictions: ``[N]`` int true and predicted labels of the support rows.
        self_index: ``[B]`` each query's own support row (training split; -1: none), or None.
        max_q: cap on ``q``; the widest search is ``max_q`` neighbours (+1 with ``self_index``).
        initial_k: first search width, or ``[B]`` per-row first widths (e.g. the previous ``q``).
        growth: factor by which ``k`` grows for unresolved rows.

    Returns:
        :class:`SimilarityResult` on the CPU; ``d_nearest`` recomputed exactly from the two vectors.

    Raises:
        ValueError: ``growth < 2``.
    """
    if growth < 2:
        raise ValueError(f"growth must be >= 2, got {growth}")
    batch = queries.shape[0]
    ntotal = int(searcher.ntotal)
    q = torch.zeros(batch, dtype=torch.long)
    nearest = torch.full((batch,), -1, dtype=torch.long)
    searched = torch.zeros(batch, dtype=torch.long)
    if batch == 0 or ntotal == 0:
        return SimilarityResult(q, nearest, torch.full((batch,), float("inf")), searched)
    query_prediction = query_prediction.long().cpu()
    support_labels = support_labels.long().cpu()
    support_predictions = support_predictions.long().cpu()
    own = None if self_index is None else self_index.long().cpu()
    k_cap = min(ntotal, int(max_q) + (0 if own is None else 1))
    if isinstance(initial_k, torch.Tensor):
        k_row = initial_k.detach().long().cpu().clamp(1, k_cap)
    else:
        k_row = torch.full((batch,), min(max(int(initial_k), 1), k_cap), dtype=torch.long)
    pending = torch.arange(batch)
    while pending.numel() > 0:
        unresolved = []
        for k in torch.unique(k_row[pending]).tolist():  # a few distinct widths per round
            group = pending[k_row[pending] == k]
            _, rows = searcher.search(queries[group.to(queries.device)], k)
            q_g, nearest_g, resolved = similarity_from_neighbors(
                rows.cpu(),
                query_prediction[group],
                support_labels,
                support_predictions,
                None if own is None else own[group],
                max_q,
            )
            q[group] = q_g
            nearest[group] = nearest_g
            searched[group] = k
            if k < k_cap:
                unresolved.append(group[~resolved])
        pending = torch.cat(unresolved) if unresolved else pending[:0]
        k_row[pending] = torch.clamp(k_row[pending] * growth, max=k_cap)
    d_nearest = torch.full((batch,), float("inf"))
    found = nearest >= 0
    if bool(found.any()):
        where = found.nonzero().squeeze(1)
        d_nearest[where] = searcher.pair_distances(queries[where.to(queries.device)], nearest[where]).float().cpu()
    return SimilarityResult(q, nearest, d_nearest, searched)


@torch.no_grad()
def dense_similarity(
    queries: torch.Tensor,
    support: torch.Tensor,
    query_prediction: torch.Tensor,
    support_labels: torch.Tensor,
    support_predictions: torch.Tensor,
    self_index: torch.Tensor | None = None,
    max_q: int = 2048,
    chunk_elements: int = 1 << 20,
) -> SimilarityResult:
    """``q``, nearest row and ``d_nearest`` from one exact pass over all support rows, without a k-nearest search.

    ``q`` = number of rows ordered (by distance, row index) before the nearest failing row; equals
    :func:`compute_similarity` over an exact search except at floating-point near-ties.

    Args:
        queries: ``[B, D]`` float vectors.
        support: ``[N, D]`` float support vectors; the computation runs on their device.
        query_prediction: ``[B]`` int; support_labels / support_predictions: ``[N]`` int.
        self_index: ``[B]`` each query's own support row (-1: none), excluded by identity; or None.
        max_q: cap on ``q``.
        chunk_elements: distance-matrix floats per chunk of ``chunk_elements // N`` queries.

    Returns:
        :class:`SimilarityResult` on the CPU (``searched_k = N`` for every row).
    """
    batch, n = queries.shape[0], support.shape[0]
    device = support.device
    if batch == 0 or n == 0:
        return SimilarityResult(
            torch.zeros(batch, dtype=torch.long),
            torch.full((batch,), -1, dtype=torch.long),
            torch.full((batch,), float("inf")),
            torch.zeros(batch, dtype=torch.long),
        )
    support = support.float()
    labels = support_labels.long().to(device)
    predictions = support_predictions.long().to(device)
    query_prediction = query_prediction.long().to(device)
    classes = int(torch.maximum(predictions.max(), query_prediction.max())) + 1
    # [C, N]: 0 where a support row fails for a query predicted c, +inf where it continues the run
    failing = (labels != predictions).view(1, -1) | (
        predictions.view(1, -1) != torch.arange(classes, device=device)[:, None]
    )
    penalty = torch.where(failing, 0.0, float("inf"))
    own = None if self_index is None else self_index.long().to(device)
    norms = (support * support).sum(dim=1)
    rows = torch.arange(n, device=device)
    q_all, nearest_all = [], []
    step = max(1, int(chunk_elements) // n)
    for start in range(0, batch, step):  # chunks of queries, each one vectorised pass
        part = queries[start : start + step].to(device).float()
        dist = torch.addmm(norms.view(1, -1), part, support.T, alpha=-2.0)
        dist.add_((part * part).sum(dim=1, keepdim=True)).clamp_(min=0.0)
        if own is not None:  # the query's own row is not a neighbour: infinitely far
            mine = own[start : start + step]
            has = (mine >= 0).nonzero().squeeze(1)
            dist[has, mine[has]] = float("inf")
        fail_dist, fail_row = (dist + penalty[query_prediction[start : start + step]]).min(dim=1)  # ties: lowest row
        # rows ordered before the nearest failing row: closer, or as close with a lower index
        # (with no failing row, fail_dist = inf and every finite row counts)
        q_part = (dist < fail_dist[:, None]).sum(dim=1, dtype=torch.int32).long()
        # exact ties with the failing row are rare: resolved by row index only where they occur
        ties = ((dist == fail_dist[:, None]).sum(dim=1, dtype=torch.int32) > 1) & torch.isfinite(fail_dist)
        if bool(ties.any()):
            t = ties.nonzero().squeeze(1)
            level = dist[t] == fail_dist[t, None]
            q_part[t] += (level & (rows[None, :] < fail_row[t, None])).sum(dim=1)
        q_all.append(q_part.clamp(max=int(max_q)).cpu())
        near_dist, near_row = dist.min(dim=1)
        nearest_all.append(torch.where(torch.isfinite(near_dist), near_row, torch.full_like(near_row, -1)).cpu())
    q, nearest = torch.cat(q_all), torch.cat(nearest_all)
    d_nearest = torch.full((batch,), float("inf"))
    found = (nearest >= 0).nonzero().squeeze(1)
    if found.numel():
        diff = queries[found.to(queries.device)].to(device).float() - support[nearest[found].to(device)]
        d_nearest[found] = (diff * diff).sum(dim=1).float().cpu()
    return SimilarityResult(q, nearest, d_nearest, torch.full((batch,), n, dtype=torch.long))
