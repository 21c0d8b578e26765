"""Distance ``d``: the query's nearest-neighbour distance placed in class-wise empirical CDFs.

Reference: Schmaltz (2025), Similarity-Distance-Magnitude Activations, arXiv:2509.12760 (the Distance term).

    d = min_c d_c,    d_c = 1 - #{v in list_c : v < d_nearest} / |list_c|    (0 for an empty list)

``d_nearest``: squared L2 distance to the nearest support exemplar; ``list_c``: sorted ``d_nearest`` of the reference
points of TRUE class ``c`` with ``q > 0``. ``d = 1``: as close as every reference point, ``0``: farther than all
(derivation and :data:`TIE_TOLERANCE`: docs/how_sdm_works.md, section 'Distance d').
"""

from __future__ import annotations

import torch

__all__ = ["class_distance_lists", "distance_quantile", "TIE_TOLERANCE"]

#: Relative difference (to the larger of the query's value and the list's mean) under which a query's
#: ``d_nearest`` counts as equal to a reference value: float32 features shift in their last bits with the batch.
TIE_TOLERANCE = 1e-5


def class_distance_lists(
    d_nearest: torch.Tensor, labels: torch.Tensor, q: torch.Tensor, num_classes: int
) -> list[torch.Tensor]:
    """Per-class sorted ``d_nearest`` of the reference points with ``q > 0`` (OOD points left out).

    Args:
        d_nearest: ``[N]`` float squared L2 distances to the nearest support exemplar.
        labels: ``[N]`` int true labels in ``0..C-1``.
        q: ``[N]`` similarity.
        num_classes: ``C``.

    Returns:
        ``C`` sorted 1-D tensors in ``d_nearest``'s dtype (possibly empty).
    """
    keep = q > 0
    values = d_nearest[keep]
    lab = labels.long()[keep]
    return [torch.sort(values[lab == c]).values for c in range(num_classes)]


def distance_quantile(d_nearest: torch.Tensor, lists: list[torch.Tensor]) -> torch.Tensor:
    """``d = min_c (1 - #{list_c < d_nearest} / |list_c|)``, 0 if any list is empty (Schmaltz 2025, arXiv:2509.12760).

    Values within :data:`TIE_TOLERANCE` of a list value count as equal to it.

    Args:
        d_nearest: ``[B]`` float query distances (squared L2).
        lists: per-class sorted reference lists from :func:`class_distance_lists`.

    Returns:
        ``[B]`` float32 in ``[0, 1]``.
    """
    values = d_nearest.float()
    if not lists or any(reference.numel() == 0 for reference in lists):
        return torch.zeros_like(values)
    d = torch.ones(values.shape, dtype=torch.float64, device=values.device)
    for reference in lists:  # a loop over classes, not over points
        reference = reference.to(device=values.device, dtype=values.dtype)
        n = reference.numel()
        at_or_above = n - torch.searchsorted(reference, _snap(values, reference), side="left")
        d = torch.minimum(d, at_or_above.double() / n)
    return d.float()


def _snap(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``values``, each replaced by its nearest ``reference`` value when within :data:`TIE_TOLERANCE` of it."""
    n = reference.numel()
    right = torch.searchsorted(reference, values).clamp(max=n - 1)
    left = (right - 1).clamp(min=0)
    below, above = reference[left], reference[right]
    nearest = torch.where((values - below).abs() <= (above - values).abs(), below, above)
    scale = torch.maximum(values.abs(), reference.abs().mean())
    return torch.where((nearest - values).abs() <= TIE_TOLERANCE * scale, nearest, values)
