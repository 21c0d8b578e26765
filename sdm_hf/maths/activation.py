"""The SDM activation and the quantities built directly on it.

Reference: Schmaltz (2025), *Similarity-Distance-Magnitude Activations* (arXiv:2509.12760).
Notation: ``z'`` the SDM head's logits, ``q`` the similarity (see :mod:`sdm_hf.maths.similarity`),
``d`` the distance quantile (see :mod:`sdm_hf.maths.distance`), ``y_hat = argmax z'``.

Pure tensor maths: nothing here searches neighbours, touches the disk or imports
transformers. Every function accepts batched tensors and broadcasts ``q`` / ``d`` given
as ``[B]`` or ``[B, 1]`` against logits ``[B, C]``.

The activation is

    sdm(z')_i = (2 + q) ** (d * z'_i) / sum_c (2 + q) ** (d * z'_c)

computed as ``softmax(z' * d * ln(2 + q))`` so that it never overflows. With
``q = e - 2`` and ``d = 1`` it is exactly the softmax; with ``d = 0`` it is uniform. The
base ``2 + q`` grows with the number of correctly predicted neighbours that agree with the
prediction, and ``d`` acts as an inverse temperature that shrinks towards 0 far from the
labelled data.

Built on it: the change-of-base loss ``-log_{2+q} sdm(z')_y`` (:func:`sdm_loss`), the
rescaled similarity ``q' = min(q, (2 + q) ** sdm(z')_{y_hat})`` (:func:`rescaled_similarity`),
the out-of-distribution flag ``floor(q') <= 0`` (:func:`is_out_of_distribution`) and the
high-reliability rule (:func:`high_reliability_mask`), whose thresholds come from Algorithm 1
(:func:`sdm_hf.maths.calibration.high_reliability_thresholds`).
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
    """SDM activation.

    Args:
        logits: ``[B, C]`` logits ``z'`` of the SDM head's classifier.
        q: ``[B]`` or ``[B, 1]`` similarity (a count >= 0; any real value >= 0 works).
        d: ``[B]`` or ``[B, 1]`` distance quantile in ``[0, 1]``.

    Returns:
        ``[B, C]`` probabilities; each row sums to 1.

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
    """Change-of-base log of the SDM activation: ``log_{2+q} sdm(z')``.

    Computed as ``log_softmax(z' d ln(2+q)) / ln(2+q)``, which is numerically stable.

    Args:
        logits: ``[B, C]``.
        q: ``[B]`` or ``[B, 1]``, >= 0.
        d: ``[B]`` or ``[B, 1]`` in ``[0, 1]``.

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
    """SDM negative log-likelihood ``-log_{2+q} sdm(z')_y``, the training loss of an SDM head.

    Equals ``-log_softmax(z' d ln(2+q))_y / ln(2+q)`` (the change-of-base formula applied to
    the activation). ``q`` and ``d`` are treated as constants (detached): they come from a
    neighbour search that has no gradient. Its gradient with respect to the logits is
    ``d * (sdm(z') - onehot(y))``. With ``q = e - 2`` and ``d = 1`` it equals
    ``torch.nn.functional.cross_entropy``. See Schmaltz (2025), *Similarity-Distance-Magnitude
    Activations*.

    Args:
        logits: ``[B, C]``.
        labels: ``[B]`` integer class indices.
        q: ``[B]`` similarity values (detached).
        d: ``[B]`` distance quantiles (detached).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        A scalar (``"mean"``, ``"sum"``) or the ``[B]`` per-point losses (``"none"``), >= 0;
        each point's loss is a logarithm in its own base ``2 + q``, not in nats.
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
    """Rescaled similarity ``q' = min(q, (2 + q) ** sdm(z')_{y_hat})``.

    ``q'`` ties the similarity to the output's own confidence: since ``sdm(z')_{y_hat}`` lies
    in ``[1/C, 1]``, ``(2 + q) ** sdm(z')_{y_hat}`` lies between ``(2 + q) ** (1/C)`` and
    ``2 + q``: a large ``q`` survives in ``q'`` only when the prediction is also confident,
    and ``q' <= q`` always. Algorithm 1 thresholds ``q'`` (``q' >= q'_min``). See Schmaltz (2025),
    *Similarity-Distance-Magnitude Activations*.

    Args:
        q: ``[B]`` similarity.
        predicted_probability: ``[B]`` SDM probability of the predicted class.

    Returns:
        ``[B]`` float tensor: in ``[1, q]`` when ``q >= 1`` and exactly 0 when ``q = 0``.
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
    """The high-reliability (HR) rule: which points the calibrated SDM estimator admits.

    A point is admitted iff calibration found a threshold (``q_min`` finite), the point is
    not OOD, ``q' >= q_min`` and ``sdm(z')_{y_hat} >= psi_{y_hat}``. Because Algorithm 1
    only succeeds with every ``psi_c >= alpha > 0.5``, at most one class can pass its
    threshold, so the probability condition is the same as "the set
    ``{c : sdm(z')_c >= psi_c}`` is exactly ``{y_hat}``". The probability comparison is made
    in float32, as Algorithm 1's is, so that a calibration point lands on the same side of
    ``psi`` at inference as it did during calibration.
    See Schmaltz (2025), *Similarity-Distance-Magnitude Activations*, Algorithm 1.

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
