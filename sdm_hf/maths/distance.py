"""Distance ``d``: the query's nearest-neighbour distance placed in class-wise eCDFs.

``d_nearest`` is the squared L2 distance (FAISS's convention) from the query's exemplar to
its nearest support exemplar. For each TRUE class ``c`` the reference list holds the sorted
``d_nearest`` values of the reference points (calibration points, or the training split,
self excluded, during training) with label ``c`` and ``q > 0``. Per class,

    d_c = 1 - #{v in list_c : v < d_nearest} / |list_c|,

the fraction of that list that is ``>=`` the query's ``d_nearest`` (ties count in the
query's favour); an empty list gives ``d_c = 0``. A query within a relative ``1e-5`` of a
reference value counts as tied with it (:data:`TIE_TOLERANCE`): float32 features of the same
text differ in their last bits with the batch they were computed in (padding changes the
order of the sums), and without this a text equal to a calibration text would fall on either
side of its own value. ``d = min_c d_c``, in ``[0, 1]``: 1 for a
query at least as close as every reference point, 0 for one farther than all of them. The
minimum is the conservative choice: a query that is unusually far for any one class gets a
small ``d``, which flattens the SDM activation towards uniform. See Schmaltz (2025),
*Similarity-Distance-Magnitude Activations* (the Distance term).
"""

from __future__ import annotations

import torch

__all__ = ["class_distance_lists", "distance_quantile", "TIE_TOLERANCE"]

#: Relative distance under which a query's ``d_nearest`` counts as equal to a reference value
#: (relative to the larger of the query's value and the list's mean).
TIE_TOLERANCE = 1e-5


def class_distance_lists(
    d_nearest: torch.Tensor, labels: torch.Tensor, q: torch.Tensor, num_classes: int
) -> list[torch.Tensor]:
    """Sorted per-class reference lists.

    Args:
        d_nearest: ``[N]`` squared L2 distances to the nearest support exemplar.
        labels: ``[N]`` true labels in ``0..C-1``.
        q: ``[N]`` similarity; points with ``q = 0`` (OOD) are left out.
        num_classes: ``C``.

    Returns:
        ``C`` sorted 1-D float tensors (possibly empty).
    """
    keep = q > 0
    values = d_nearest[keep]
    lab = labels.long()[keep]
    return [torch.sort(values[lab == c]).values for c in range(num_classes)]


def distance_quantile(d_nearest: torch.Tensor, lists: list[torch.Tensor]) -> torch.Tensor:
    """``d = min_c (1 - #{list_c < d_nearest} / |list_c|)``; 0 for an empty list.

    Args:
        d_nearest: ``[B]`` query distances.
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
    """``values`` with each one within :data:`TIE_TOLERANCE` of its nearest ``reference``
    value replaced by that value (a value in the list is its own nearest: unchanged)."""
    n = reference.numel()
    right = torch.searchsorted(reference, values).clamp(max=n - 1)
    left = (right - 1).clamp(min=0)
    below, above = reference[left], reference[right]
    nearest = torch.where((values - below).abs() <= (above - values).abs(), below, above)
    scale = torch.maximum(values.abs(), reference.abs().mean())
    return torch.where((nearest - values).abs() <= TIE_TOLERANCE * scale, nearest, values)
