"""The SDM activation and what is built on it: its loss, the rescaled similarity ``q'``, OOD and the HR rule.

Reference: Schmaltz (2025), Similarity-Distance-Magnitude Activations, arXiv:2509.12760.

    sdm(z')_i = (2 + q) ** (d z'_i) / sum_c (2 + q) ** (d z'_c) = softmax(z' d ln(2 + q))_i

``z'`` the head's logits ``[B, C]``; ``q`` (similarity) and ``d`` (distance quantile) broadcast as a scalar, ``[B]``
or ``[B, 1]``. Pure tensor maths, no search or I/O (derivation: docs/how_sdm_works.md, section 'Magnitude and the
SDM activation').
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "SOFTMAX_EQUIVALENT_Q",
    "sdm_activation",
    "log_sdm",
    "sdm_loss",
    "rescaled_similarity",
    "is_out_of_distribution",
    "high_reliability_mask",
]

#: The similarity value for which the SDM activation reduces to the softmax (base e).
SOFTMAX_EQUIVALENT_Q = math.e - 2.0


def _as_column(value: torch.Tensor | float, logits: torch.Tensor) -> torch.Tensor:
    """Turn a scalar, ``[B]`` or ``[B, 1]`` value into a ``[B, 1]`` tensor like ``logits``."""
    value = torch.as_tensor(value, dtype=logits.dtype, device=logits.device)
    if value.dim() == 0:
        return value.expand(logits.shape[0], 1)
    if value.dim() == 1:
        return value.unsqueeze(1)
    return value


def _scaled_logits(
    logits: torch.Tensor, q: torch.Tensor | float, d: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(z' * d * ln(2 + q), ln(2 + q))``, both broadcast to ``[B, C]`` / ``[B, 1]``."""
    q = _as_column(q, logits)
    d = _as_column(d, logits)
    log_base = torch.log(2.0 + q)
    return logits * d * log_base, log_base


def sdm_activation(logits: torch.Tensor, q: torch.Tensor | float, d: torch.Tensor | float) -> torch.Tensor:
    """SDM activation ``sdm(z') = softmax(z' d ln(2 + q))`` (Schmaltz 2025, arXiv:2509.12760).

    Args:
        logits: ``[B, C]`` float logits ``z'``.
        q: scalar, ``[B]`` or ``[B, 1]`` similarity >= 0 (a count; any real works).
        d: scalar, ``[B]`` or ``[B, 1]`` distance quantile in ``[0, 1]``.

    Returns:
        ``[B, C]`` probabilities in ``logits``' dtype, rows summing to 1.

    Example:
        >>> import math, torch
        >>> z = torch.tensor([[2.0, 0.0]])
        >>> torch.allclose(sdm_activation(z, math.e - 2, 1.0), torch.softmax(z, -1))
        True
        >>> sdm_activation(z, 3.0, 0.0)
        tensor([[0.5000, 0.5000]])
    """
    scaled, _ = _scaled_logits(logits, q, d)
    return torch.softmax(scaled, dim=-1)


def log_sdm(logits: torch.Tensor, q: torch.Tensor | float, d: torch.Tensor | float) -> torch.Tensor:
    """``log_{2+q} sdm(z') = log_softmax(z' d ln(2+q)) / ln(2+q)`` (Schmaltz 2025, arXiv:2509.12760).

    ``logits``, ``q`` and ``d`` as for :func:`sdm_activation`.

    Returns:
        ``[B, C]`` log-probabilities in base ``2 + q`` (<= 0).
    """
    scaled, log_base = _scaled_logits(logits, q, d)
    return torch.log_softmax(scaled, dim=-1) / log_base


def sdm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    q: torch.Tensor | float,
    d: torch.Tensor | float,
    reduction: str = "mean",
) -> torch.Tensor:
    """SDM head training loss ``-log_{2+q} sdm(z')_y`` (Schmaltz 2025, arXiv:2509.12760).

    ``q`` and ``d`` are detached (the neighbour search has no gradient); with ``q = e - 2``, ``d = 1`` this
    is the cross-entropy.

    Args:
        logits: ``[B, C]`` float.
        labels: ``[B]`` integer classes.
        q, d: scalar or ``[B]`` similarity and distance quantile.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        Scalar, or ``[B]`` for ``"none"``; >= 0, each in its own base ``2 + q`` (not nats).

    Raises:
        ValueError: unknown ``reduction``.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    q = torch.as_tensor(q, dtype=logits.dtype, device=logits.device).detach()
    d = torch.as_tensor(d, dtype=logits.dtype, device=logits.device).detach()
    log_p = log_sdm(logits, q, d)
    per_point = -log_p.gather(1, labels.long().view(-1, 1)).squeeze(1)
    if reduction == "mean":
        return per_point.mean()
    if reduction == "sum":
        return per_point.sum()
    return per_point


def rescaled_similarity(q: torch.Tensor, predicted_probability: torch.Tensor) -> torch.Tensor:
    """Rescaled similarity ``q' = min(q, (2 + q) ** sdm(z')_{y_hat})`` (Schmaltz 2025, arXiv:2509.12760).

    A large ``q`` survives only when the prediction is also confident; Algorithm 1 thresholds ``q'``.

    Args:
        q: ``[B]`` similarity.
        predicted_probability: ``[B]`` float ``sdm(z')_{y_hat}``.

    Returns:
        ``[B]`` in ``predicted_probability``'s dtype: in ``[1, q]`` for ``q >= 1``, exactly 0 for ``q = 0``.
    """
    q = q.to(predicted_probability.dtype)
    return torch.minimum(q, torch.pow(2.0 + q, predicted_probability))


def is_out_of_distribution(rescaled: torch.Tensor) -> torch.Tensor:
    """OOD flag: ``floor(q') <= 0`` (equivalently ``q = 0``). ``[B]`` -> ``[B]`` bool."""
    return torch.floor(rescaled) <= 0


def high_reliability_mask(
    predicted_probability: torch.Tensor,
    prediction: torch.Tensor,
    rescaled: torch.Tensor,
    q_min: float,
    thresholds: torch.Tensor,
) -> torch.Tensor:
    """High-reliability (HR) membership (Schmaltz 2025, arXiv:2509.12760, Algorithm 1).

    Admitted iff ``q_min`` is finite, not OOD, ``q' >= q_min`` and ``sdm(z')_{y_hat} >= psi_{y_hat}``; the last
    comparison is in float32, as in Algorithm 1, so calibration points fall on the same side of ``psi`` again.

    Args:
        predicted_probability: ``[B]`` SDM probability of the predicted class.
        prediction: ``[B]`` predicted class ``y_hat``.
        rescaled: ``[B]`` rescaled similarity ``q'``.
        q_min: Algorithm 1's ``q'_min`` (``inf`` when calibration found none).
        thresholds: ``[C]`` class-wise thresholds ``psi``.

    Returns:
        ``[B]`` bool tensor.
    """
    if not math.isfinite(float(q_min)):
        return torch.zeros_like(prediction, dtype=torch.bool)
    psi = thresholds.to(device=prediction.device, dtype=torch.float32)[prediction.long()]
    admitted = predicted_probability.to(torch.float32) >= psi
    admitted &= rescaled >= float(q_min)
    admitted &= ~is_out_of_distribution(rescaled)
    return admitted
