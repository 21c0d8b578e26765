"""Exact neighbour-search building blocks over FAISS, for :mod:`sdm_hf.search.index` (which picks the backend).

Blocked float16 search, GPU shards, bounded float32 staging and (distance, row) ordering of results.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import faiss
import numpy as np
import torch

__all__ = [
    "STAGING_BYTES",
    "rows_within",
    "as_float32",
    "add_chunked",
    "build_shards",
    "blocked_float16_search",
    "order_rows",
]

# Bytes of float32 staging for exemplars (adding to FAISS, blocked float16 search, IVF decoding).
STAGING_BYTES = 64 * 1024 * 1024


def rows_within(budget_bytes: int, row_floats: int) -> int:
    """How many float32 rows of ``row_floats`` values fit in ``budget_bytes`` (at least 1).

    Example:
        >>> rows_within(4 * 1000, 10)
        100
    """
    return max(1, budget_bytes // (4 * max(row_floats, 1)))


def as_float32(x: torch.Tensor) -> np.ndarray:
    """A C-contiguous float32 numpy copy/view of ``x`` on the CPU (what FAISS takes)."""
    return np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)


def add_chunked(index: Any, vectors: torch.Tensor) -> None:
    """Add ``[n, M]`` rows to a FAISS ``index`` in float32 chunks of at most ``STAGING_BYTES`` (bounded memory)."""
    step = rows_within(STAGING_BYTES, int(vectors.shape[1]))
    for start in range(0, vectors.shape[0], step):  # bounded float32 staging
        index.add(as_float32(vectors[start : start + step]))


def build_shards(vectors: torch.Tensor, count: int, make_shard: Callable[[int], Any]) -> Any:
    """A ``faiss.IndexShards`` whose shard ``j`` (an empty index from ``make_shard(j)``) holds the ``j``-th of
    ``count`` contiguous row ranges of the ``[N, M]`` ``vectors``; searched in parallel, it returns global rows.

    Raises:
        ValueError: ``count < 1``.

    Example:
        >>> import faiss, torch
        >>> shards = build_shards(torch.eye(4), 2, lambda j: faiss.IndexFlatL2(4))
        >>> [shards.at(j).ntotal for j in range(2)], shards.search(torch.eye(4)[3:].numpy(), 1)[1].tolist()
        ([2, 2], [[3]])
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    # (dim, threaded, successive_ids): one thread per shard, ids shifted by the rows before; the
    # SWIG stub lists only the first overload's arguments
    shards: Any = faiss.IndexShards(int(vectors.shape[1]), True, True)  # type: ignore[call-arg]
    bounds = np.linspace(0, vectors.shape[0], count + 1).round().astype(int)
    for j in range(count):
        shard = make_shard(j)
        add_chunked(shard, vectors[bounds[j] : bounds[j + 1]])
        shards.add_shard(shard)
    return shards


def order_rows(distances: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order each row of ``[B, k]`` distance-sorted results by (distance, index), so ties resolve the same way
    every time; returns ``(distances, indices)``, only tied rows re-sorted.

    Example:
        >>> d, i = order_rows(torch.tensor([[0.0, 1.0, 1.0]]), torch.tensor([[4, 9, 2]]))
        >>> i.tolist()
        [[4, 2, 9]]
    """
    tied = (distances[:, 1:] == distances[:, :-1]).any(dim=1)
    if not bool(tied.any()):
        return distances, indices
    rows = tied.nonzero().squeeze(1)
    d, i = distances[rows], indices[rows]
    by_index = torch.argsort(i, dim=1)
    d, i = d.gather(1, by_index), i.gather(1, by_index)
    by_distance = torch.sort(d, dim=1, stable=True).indices
    distances, indices = distances.clone(), indices.clone()
    distances[rows] = d.gather(1, by_distance)
    indices[rows] = i.gather(1, by_distance)
    return distances, indices


def blocked_float16_search(stored: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours of ``[B, M]`` ``queries`` among the ``[N, M]`` float16 rows ``stored``, by matrix
    products on float32 blocks of ``STAGING_BYTES`` (faster than FAISS's float16 scan, which has no BLAS).

    Returns:
        ``(distances [B, k] float32, rows [B, k] int64)`` on ``stored``'s device, squared L2 re-scored exactly
        as ``|q - x|^2``, sorted by distance (ties: pass through :func:`order_rows`).
    """
    device = stored.device
    queries = queries.detach().to(device, torch.float32)
    n, dim = stored.shape
    block = max(k, rows_within(STAGING_BYTES, dim))
    heap = faiss.ResultHeap(queries.shape[0], k)
    on_cpu = device.type == "cpu"
    q = as_float32(queries) if on_cpu else None
    query_norms = (queries * queries).sum(1, keepdim=True)
    for start in range(0, n, block):  # blocks of the support: bounded float32 working set
        vectors = stored[start : start + block].float()
        take = min(k, vectors.shape[0])
        if q is not None:
            d, i = faiss.knn(q, as_float32(vectors), take)
        else:
            dist = queries @ vectors.T  # the one [B, block] buffer: the rest is done in place
            dist.mul_(-2.0).add_(query_norms).add_((vectors * vectors).sum(1)).clamp_(min=0)
            top_d, top_i = torch.topk(dist, take, dim=1, largest=False, sorted=False)
            d, i = top_d.cpu().numpy(), top_i.cpu().numpy()
        heap.add_result(d, i + start)
    heap.finalize()
    best_i = torch.from_numpy(heap.I).to(device)
    exact = torch.empty(best_i.shape, dtype=torch.float32, device=device)
    # one [b, k, M] float32 block of differences at a time, squared in place: bounded memory
    rows_per_chunk = rows_within(STAGING_BYTES, k * dim)
    for start in range(0, queries.shape[0], rows_per_chunk):
        stop = start + rows_per_chunk
        diff = stored[best_i[start:stop]].float().sub_(queries[start:stop].unsqueeze(1))
        exact[start:stop] = diff.mul_(diff).sum(-1)
    order = torch.sort(exact, dim=1, stable=True).indices
    return exact.gather(1, order), best_i.gather(1, order)
