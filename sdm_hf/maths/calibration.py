"""Algorithm 1 (the high-reliability region's ``q'_min`` and class-wise ``psi``), effective sample sizes, lower bounds.

Reference: Schmaltz (2025), Similarity-Distance-Magnitude Activations, arXiv:2509.12760, Algorithm 1.

Over non-OOD calibration points, with ``S_c(t)`` the sorted true-class probabilities ``sdm(z')_y`` of class ``c``
at ``q' >= t``: ``psi_c(t) = S_c(t)[min(int((1 - alpha) |S_c(t)|), |S_c(t)| - 1)]`` (0 if empty), and ``q'_min`` is
the smallest candidate ``t`` (a ``q'`` value) with ``psi_c(t) >= alpha`` for every class (none: ``inf``, empty
region). Lower bound: ``eps = max_c sqrt(ln(2 / (1 - alpha)) / (2 n_c))``, ``d_lower = clip(d - eps, 0, 1)``.
Derivations (the O(N log N) form, the small-region guard): docs/how_sdm_works.md, sections 'The high-reliability
region (Algorithm 1)' and 'The lower-bound variant'.
"""

from __future__ import annotations

import math

import torch

from .activation import is_out_of_distribution

__all__ = [
    "quantile_index",
    "suffix_counts",
    "high_reliability_thresholds",
    "explain_empty_region",
    "required_points_per_class",
    "minimum_class_points",
    "class_rescaled_lists",
    "effective_sample_sizes",
    "lower_bound_margin",
]


def quantile_index(n: torch.Tensor, alpha: float) -> torch.Tensor:
    """``min(int((1 - alpha) * n), n - 1)`` in double precision, elementwise (int64)."""
    k = torch.trunc((1.0 - float(alpha)) * n.double()).long()
    return torch.minimum(k, n.long() - 1)


def suffix_counts(sorted_values: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Number of ``sorted_values >= t`` for each ``t`` in ``thresholds``."""
    return sorted_values.numel() - torch.searchsorted(sorted_values, thresholds, side="left")


def _prepare(
    true_class_probability: torch.Tensor,
    rescaled_similarity: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    alpha: float,
):
    """Validated 1-D arrays without OOD points: ``(q', [(sorted q', sorted q' below alpha, p, q') per class])``."""
    p = torch.as_tensor(true_class_probability).detach().cpu().double()
    r = torch.as_tensor(rescaled_similarity).detach().cpu().double()
    y = torch.as_tensor(labels).detach().cpu().long()
    if not (p.shape == r.shape == y.shape) or p.dim() != 1:
        raise ValueError(
            "true_class_probability, rescaled_similarity and labels must be 1-D and of equal "
            f"length; got shapes {tuple(p.shape)}, {tuple(r.shape)}, {tuple(y.shape)}"
        )
    keep = ~is_out_of_distribution(r)
    p, r, y = p[keep], r[keep], y[keep]
    below = p.float() < torch.tensor(float(alpha), dtype=torch.float32)
    per_class = []
    for c in range(num_classes):  # a loop over classes, not points
        in_c = y == c
        per_class.append((torch.sort(r[in_c]).values, torch.sort(r[in_c & below]).values, p[in_c], r[in_c]))
    return r, per_class


def high_reliability_thresholds(
    true_class_probability: torch.Tensor,
    rescaled_similarity: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    alpha: float,
    min_points: int = 0,
) -> tuple[float, torch.Tensor]:
    """Algorithm 1: ``(q'_min, psi)`` from the calibration arrays, in O(N log N) (Schmaltz 2025, arXiv:2509.12760).

    Args:
        true_class_probability: ``[N]`` float ``sdm(z')_y``, the SDM probability of the TRUE class.
        rescaled_similarity: ``[N]`` float ``q'``; OOD points (``floor(q') <= 0``) are ignored.
        labels: ``[N]`` int true labels in ``0..C-1``.
        num_classes: ``C``.
        alpha: target accuracy in ``(0.5, 1]``; compared in float32.
        min_points: small-region guard ``m`` (0: Algorithm 1 as published): a candidate also needs ``m`` non-OOD
            points of every class at or above it; the result is then the unguarded one or an empty region.

    Returns:
        ``(q_min, thresholds)``: float ``q_min`` (``inf`` when no candidate works) and ``[C]`` float64 ``psi``
        (zeros when no candidate works).

    Raises:
        ValueError: the three arrays are not 1-D of one length.

    Example:
        >>> import torch
        >>> q_min, psi = high_reliability_thresholds(
        ...     torch.tensor([0.99, 0.98, 0.97, 0.99]), torch.tensor([2.0, 3.0, 2.5, 4.0]),
        ...     torch.tensor([0, 0, 1, 1]), num_classes=2, alpha=0.95)
        >>> q_min, psi.tolist()
        (2.0, [0.9800000190734863, 0.9700000286102295])
    """
    r, per_class = _prepare(true_class_probability, rescaled_similarity, labels, num_classes, alpha)
    empty = (math.inf, torch.zeros(num_classes, dtype=torch.float64))
    if r.numel() == 0 or num_classes == 0:
        return empty
    candidates = torch.unique(r)  # sorted ascending
    works = torch.ones(candidates.shape, dtype=torch.bool)
    for sorted_r, sorted_r_below, _, _ in per_class:
        n = suffix_counts(sorted_r, candidates)
        n_below = suffix_counts(sorted_r_below, candidates)
        works &= (n >= max(1, int(min_points))) & (n_below <= quantile_index(n, alpha))
    if not bool(works.any()):
        return empty
    q_min = float(candidates[int(works.nonzero()[0, 0])])
    thresholds = torch.empty(num_classes, dtype=torch.float64)
    for c, (_, _, p_c, r_c) in enumerate(per_class):
        s = torch.sort(p_c[r_c >= q_min]).values
        k = int(quantile_index(torch.tensor(s.numel()), alpha))
        thresholds[c] = float(s[k].float())
    return q_min, thresholds


def explain_empty_region(
    true_class_probability: torch.Tensor,
    rescaled_similarity: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    alpha: float,
    id2label: dict[int, str] | None = None,
    min_points: int = 0,
) -> str:
    """Plain-language reason why Algorithm 1 found no threshold, for the warning of an empty region.

    Args:
        true_class_probability, rescaled_similarity, labels, num_classes, alpha: as for
            :func:`high_reliability_thresholds`.
        id2label: optional class names for the message.
        min_points: the small-region guard ``m`` the thresholds were computed with.

    Returns:
        Sentences naming the failing classes (no non-OOD point, too many below ``alpha``, too few for the guard)
        and the minimum class size ``alpha`` needs.

    Raises:
        ValueError: as :func:`high_reliability_thresholds`.
    """
    _, per_class = _prepare(true_class_probability, rescaled_similarity, labels, num_classes, alpha)
    name = (lambda c: repr(id2label.get(c, c))) if id2label else (lambda c: str(c))
    reasons = []
    for c, (sorted_r, sorted_r_below, _, _) in enumerate(per_class):
        n = sorted_r.numel()
        if n == 0:
            reasons.append(f"class {name(c)} has no calibration point that is not OOD (q > 0)")
            continue
        k = int(quantile_index(torch.tensor(n), alpha))
        below = sorted_r_below.numel()
        if below > k:
            reasons.append(
                f"class {name(c)}: {below} of its {n} non-OOD calibration points have a "
                f"true-class SDM probability below alpha={alpha}, more than the {k} the "
                f"{alpha:.0%} quantile tolerates"
            )
        elif n < min_points:
            reasons.append(
                f"class {name(c)} has {n} non-OOD calibration points, fewer than the {min_points} the "
                "small-region guard (min_class_points) requires"
            )
    if min_points > 1 and math.isfinite(
        high_reliability_thresholds(true_class_probability, rescaled_similarity, labels, num_classes, alpha)[0]
    ):
        reasons = [
            f"without the small-region guard (min_class_points) Algorithm 1 would admit points, but at its first "
            f"q' threshold where every class reaches alpha some class has fewer than the {min_points} calibration "
            "points the guard requires, too few for that class's accuracy to be trusted"
        ]
    if not reasons:
        reasons.append("no single q' threshold leaves every class with enough points above alpha at once")
    return (
        "; ".join(reasons) + f". With alpha={alpha}, each class needs at least {required_points_per_class(alpha)} "
        "non-OOD calibration points for its quantile to be able to reach alpha (and in "
        "practice many more); add calibration data, improve the features, or recalibrate "
        "with a lower alpha."
    )


def required_points_per_class(alpha: float) -> int:
    """Smallest class size ``n = ceil(1 / (1 - alpha))`` with ``int((1 - alpha) n) >= 1`` (20 at alpha = 0.95; 1 at
    alpha >= 1): below it ``psi_c`` is the class's minimum, so one point under ``alpha`` rules a threshold out."""
    if alpha >= 1.0:
        return 1
    return int(math.ceil(1.0 / (1.0 - float(alpha)) - 1e-9))


def minimum_class_points(setting: int | str, alpha: float) -> int:
    """The small-region guard's ``m`` at ``alpha``: ``setting`` itself when an int (0: off),
    :func:`required_points_per_class` when ``"auto"``.

    Raises:
        ValueError: ``setting`` is neither ``"auto"`` nor an integer >= 0.
    """
    if setting == "auto":
        return required_points_per_class(alpha)
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise ValueError(f"min_class_points must be 'auto' or an integer >= 0, got {setting!r}")
    return setting


def class_rescaled_lists(
    rescaled_similarity: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> list[torch.Tensor]:
    """Per-class sorted ``q'`` of ALL calibration points (OOD included), for :func:`effective_sample_sizes`.

    Args:
        rescaled_similarity: ``[N]`` float calibration ``q'``.
        labels: ``[N]`` int true labels in ``0..C-1``.
        num_classes: ``C``.

    Returns:
        ``C`` sorted 1-D float64 CPU tensors (possibly empty).
    """
    r = rescaled_similarity.detach().cpu().double()
    y = labels.detach().cpu().long()
    return [torch.sort(r[y == c]).values for c in range(num_classes)]


def effective_sample_sizes(rescaled: torch.Tensor, lists: list[torch.Tensor]) -> torch.Tensor:
    """Effective sample sizes for the lower-bound variant (Schmaltz 2025, arXiv:2509.12760).

    ``n_c(point)`` = number of class-``c`` calibration points (OOD included) with ``q'`` strictly below the point's,
    capped at ``n_c - 1`` (and at 0): the calibration evidence behind the point.

    Args:
        rescaled: ``[B]`` float ``q'`` of the points.
        lists: per-class sorted calibration ``q'`` from :func:`class_rescaled_lists`.

    Returns:
        ``[B, C]`` int64 CPU tensor.
    """
    r = rescaled.detach().cpu().double()
    columns = []
    for reference in lists:
        below = torch.searchsorted(reference, r, side="left")
        columns.append(below.clamp(max=max(reference.numel() - 1, 0)))
    if not columns:
        return torch.zeros((r.numel(), 0), dtype=torch.long)
    return torch.stack(columns, dim=1)


def lower_bound_margin(sample_sizes: torch.Tensor, alpha: float) -> torch.Tensor:
    """Hoeffding-style margin ``eps = max_c sqrt(ln(2 / (1 - alpha)) / (2 n_c))`` (Schmaltz 2025, arXiv:2509.12760).

    Args:
        sample_sizes: ``[B, C]`` int effective sample sizes from :func:`effective_sample_sizes`.
        alpha: target accuracy.

    Returns:
        ``[B]`` float32 margins in ``(0, 1]``; 1 where any ``n_c = 0`` or ``alpha >= 1``.
    """
    n = sample_sizes.double()
    if alpha >= 1.0 or n.shape[1] == 0:
        return torch.ones(n.shape[0], dtype=torch.float32)
    log_term = math.log(2.0 / (1.0 - float(alpha)))
    eps = torch.sqrt(log_term / (2.0 * n.clamp(min=1))).max(dim=1).values
    eps = torch.where((n == 0).any(dim=1), torch.ones_like(eps), eps)
    return eps.clamp(max=1.0).float()
