"""Pooling ``[B, T, H]`` hidden states into one ``[B, H]`` vector per text."""

from __future__ import annotations

import torch

from .settings import POOLINGS

__all__ = ["pool_hidden_states"]


def pool_hidden_states(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool ``(B, T, H)`` hidden states over the positions where the ``(B, T)`` 0/1 mask is 1: ``"mean"``,
    ``"last"`` / ``"cls"`` (last / first unmasked position, either padding side) or ``"mean_last"``
    (``concat(mean, last)``). Padding never reaches the result, not even as NaN; a row without tokens
    pools to zeros for ``"mean"``.

    Returns:
        ``(B, H)`` float32 (``(B, 2H)`` for ``"mean_last"``).

    Raises:
        ValueError: ``pooling`` not in :data:`~sdm_hf.features.settings.POOLINGS`.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    hidden = hidden.float()
    valid = attention_mask.bool()
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    positions = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[:2])
    if pooling == "cls":  # the first non-padding position (position 0 unless the batch is left-padded)
        first_index = torch.where(valid, positions, torch.full_like(positions, hidden.shape[1])).min(dim=1).values
        return hidden[rows, first_index.clamp(max=hidden.shape[1] - 1)]
    keep = valid.unsqueeze(-1)
    mean = torch.where(keep, hidden, 0.0).sum(1) / keep.sum(1).clamp(min=1).float()
    if pooling == "mean":
        return mean
    # last non-padding position, whichever side the padding is on
    last_index = torch.where(valid, positions, torch.full_like(positions, -1)).max(dim=1).values
    last = hidden[rows, last_index.clamp(min=0)]
    return last if pooling == "last" else torch.cat([mean, last], dim=1)
