"""Similarity ``q`` and the nearest-neighbour distance from a support-set search.

The support set holds the training split's exemplar vectors (the adaptor's outputs) with
their true labels and their predicted labels under the current weights. ``q`` counts,
walking from the nearest support exemplar outwards in ascending L2 distance, the neighbours
that were predicted correctly (``label == predicted``) AND share the query's prediction
``y_hat``, stopping at the first one that does not: ``q`` is the length of that unbroken
run, an integer in ``0..max_q``. ``q = 0`` means the nearest neighbour already fails: the
query is treated as out of distribution (OOD). A query that is itself a support point skips
its own row (by row index, so exact duplicates of it still count). See Schmaltz (2025),
*Similarity-Distance-Magnitude Activations* (the Similarity term).

The search is adaptive: a small ``k`` first, widened (x ``growth``) only for the rows whose
run reached the end of what was searched, up to ``max_q`` (plus one slot for the query's own
row when it is a support point). A widened row is searched again in full, so all of one
query's distances come from one search call (one kernel); the result equals a fixed search
with ``k = max_q`` except at exact floating-point ties.

Nothing here knows about FAISS: the search is any object with the small interface of
:class:`NeighborSearcher` (``sdm_hf.search.index.SupportIndex`` is the real one).
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
        """``[B, D]`` queries -> ``([B, k]`` squared L2 distances, ``[B, k]`` row indices), each
        row ordered by (distance, row index)."""
        ...

    def pair_distances(self, queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``[B]`` exact squared L2 distances between ``queries[i]`` (``[B, D]``) and support
        row ``rows[i]`` (``[B]`` int64)."""
        ...


@dataclass
class SimilarityResult:
    """Output of :func:`compute_similarity` (all tensors on the CPU, length ``B``).

    Attributes:
        q: ``[B]`` int64 similarity, capped at ``max_q``.
        nearest_index: ``[B]`` int64 row of the nearest support exemplar (self excluded);
            -1 when the support holds no other row.
        d_nearest: ``[B]`` float32 squared L2 distance to that exemplar (``inf`` when none).
        searched_k: ``[B]`` int64 neighbours finally searched for the row (for diagnostics).
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
    """Run length ``q`` over given neighbour lists.

    Args:
        neighbor_indices: ``[B, k]`` support rows in ascending distance; -1 marks "no row".
        query_prediction: ``[B]`` predicted class of each query.
        support_labels: ``[N]`` true labels of the support rows.
        support_predictions: ``[N]`` predicted labels of the support rows.
        self_index: ``[B]`` the query's own support row (skipped wherever it appears), or
            None / -1 for queries that are not in the support.
        max_q: optional cap on ``q``.

    Returns:
        ``(q [B] int64, nearest [B] int64, resolved [B] bool)``; ``resolved`` is True where
        a failing neighbour was seen or the cap was reached, i.e. where searching further
        cannot change ``q``.
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
    """``q``, nearest exemplar and ``d_nearest`` for a batch, with adaptive widening.

    Args:
        searcher: the support index (see :class:`NeighborSearcher`).
        queries: ``[B, D]`` vectors in the searcher's space.
        query_prediction: ``[B]`` predicted classes.
        support_labels: ``[N]`` true labels of the support rows.
        support_predictions: ``[N]`` predictions of the support rows.
        self_index: ``[B]`` own support row of each query (training split), else None.
        max_q: cap on ``q``; the widest search is ``max_q`` neighbours (+1 with self).
        initial_k: the first search's ``k``; or a ``[B]`` tensor of per-row first widths
            (e.g. from a previous ``q``, as during training), rows with the same width being
            searched together.
        growth: factor by which ``k`` grows for unresolved rows.

    Returns:
        :class:`SimilarityResult`. ``d_nearest`` is recomputed exactly from the two vectors
        (difference, then sum of squares), which avoids the cancellation of the
        ``|a|^2 + |b|^2 - 2ab`` expansion used by BLAS-based search.
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
    """``q``, nearest exemplar and ``d_nearest`` from one exact pass over all support rows, no sort.

    With neighbours ordered by (squared distance, row index), the run that ``q`` counts ends at
    the first *failing* row (``label != predicted`` or ``predicted != y_hat``), so ``q`` is the
    number of rows ordered before the nearest failing row: a masked minimum and a count per
    query instead of a k-nearest search widened until the run breaks. Cost O(B N D) for the
    distances (as any exact search) and O(B N) on top; memory ``chunk_elements`` floats per
    chunk of queries. Equals :func:`compute_similarity` over an exact search except at
    floating-point near-ties (the distances come from the ``|a|^2 + |b|^2 - 2ab`` expansion).

    Args:
        queries: ``[B, D]`` vectors; support: ``[N, D]`` support vectors (same device).
        query_prediction: ``[B]``; support_labels / support_predictions: ``[N]``.
        self_index: ``[B]`` each query's own support row (-1: none), excluded by identity.
        max_q: cap on ``q``.
        chunk_elements: queries are processed in chunks of ``chunk_elements // N`` rows.

    Returns:
        :class:`SimilarityResult` on the CPU (``searched_k`` = ``N`` for every row).
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
    # [C, N]: 0 where a support row fails for a query predicted c (wrong itself, or another
    # prediction), +inf where it continues the run; a query's row of it masks its distances
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
