"""Assembling an :class:`SDMOutput` from logits, similarity and a calibration state (pure functions).

Schmaltz (2025), Similarity-Distance-Magnitude Activations, arXiv:2509.12760, Algorithm 1: a point is in
the HR region iff it is not OOD (``q = 0``), ``q' >= q'_min`` and ``sdm(z')_{y_hat} >= psi_{y_hat}``; the
lower-bound variant applies the same rule with ``d_lower = clip(d - eps, 0, 1)`` (derivation:
docs/how_sdm_works.md, section 'The lower-bound variant').
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..maths.activation import high_reliability_mask
from ..maths.calibration import effective_sample_sizes, lower_bound_margin
from ..maths.similarity import SimilarityResult
from .state import CalibrationState, activate, with_alpha

__all__ = ["SDMOutput", "LowerBound", "lower_bound", "hr_masks", "assemble_output", "with_alpha_levels"]


@dataclass
class SDMOutput:
    """Batch output of :meth:`sdm_hf.SDMHead.predict`; all tensors on the CPU.

    Attributes:
        logits: ``(B, C)`` float32 ``z'``; prediction: ``(B,)`` int64 ``argmax z'``.
        probabilities: ``(B, C)`` ``sdm(z')``.
        q: ``(B,)`` int64; d: ``(B,)`` in ``[0, 1]``; d_nearest: ``(B,)`` squared L2 to the nearest exemplar.
        nearest_index: ``(B,)`` support row of that exemplar.
        rescaled_similarity: ``(B,)`` ``q'``.
        is_ood, in_hr: ``(B,)`` bool: ``q = 0``; admitted to the HR region.
        effective_sample_size: ``(B, C)`` per-class effective sample sizes.
        d_lower, d_upper: ``(B,)`` ``d -/+ eps`` clipped to ``[0, 1]``.
        probabilities_lower, rescaled_similarity_lower, in_hr_lower: ``sdm``, ``q'`` and HR with ``d_lower``.
        nearest_id: ids of the nearest exemplars when the support stores ids, else None.
        neighbor_indices, neighbor_distances: ``(B, k)`` when ``k_neighbors > 1`` was asked, else None.
        hr_alphas: ``(A,)`` float64, the head's alpha and ``SDMConfig.alphas`` ascending (None without them).
        in_hr_at: ``(B, A)`` bool, admitted at each of ``hr_alphas`` (as if recalibrated at that alpha).
    """

    logits: torch.Tensor
    prediction: torch.Tensor
    probabilities: torch.Tensor
    q: torch.Tensor
    d: torch.Tensor
    d_nearest: torch.Tensor
    nearest_index: torch.Tensor
    rescaled_similarity: torch.Tensor
    is_ood: torch.Tensor
    in_hr: torch.Tensor
    effective_sample_size: torch.Tensor
    d_lower: torch.Tensor
    d_upper: torch.Tensor
    probabilities_lower: torch.Tensor
    rescaled_similarity_lower: torch.Tensor
    in_hr_lower: torch.Tensor
    nearest_id: list | None = None
    neighbor_indices: torch.Tensor | None = None
    neighbor_distances: torch.Tensor | None = None
    hr_alphas: torch.Tensor | None = None
    in_hr_at: torch.Tensor | None = None

    @property
    def highest_hr_alpha(self) -> torch.Tensor | None:
        """``(B,)`` float64 highest of ``hr_alphas`` whose region admits the row (NaN: none); None without
        ``SDMConfig.alphas``. Tiers are not nested: it says nothing about the lower ones."""
        if self.hr_alphas is None or self.in_hr_at is None:
            return None
        top = torch.where(self.in_hr_at, self.hr_alphas.view(1, -1), float("-inf")).max(1).values
        return top.masked_fill(top == float("-inf"), float("nan"))

    def __len__(self) -> int:
        return int(self.prediction.shape[0])

    @property
    def predicted_probability(self) -> torch.Tensor:
        """``(B,)`` ``sdm(z')_{y_hat}``."""
        return self.probabilities.gather(1, self.prediction.view(-1, 1)).squeeze(1)

    def to_list(self, id2label: dict[int, str] | None = None) -> list[dict]:
        """One JSON-ready dict per row, with label names when ``id2label`` is given. With ``SDMConfig.alphas``
        it adds ``high_reliability_alpha`` (highest admitting tier or None) and ``high_reliability_at``
        (``{repr(alpha): bool}`` for every tier)."""
        name = (lambda c: id2label[int(c)]) if id2label else (lambda c: int(c))
        p = self.probabilities.tolist()
        p_lower = self.probabilities_lower.tolist()
        highest = self.highest_hr_alpha
        # tier names as strings ("0.9"): JSON object keys
        tiers = [] if self.hr_alphas is None else [repr(float(a)) for a in self.hr_alphas.tolist()]
        rows = []
        for i in range(len(self)):  # formatting output records, not a numeric hot path
            row: dict[str, Any] = {
                "label": name(self.prediction[i]),
                "prediction": int(self.prediction[i]),
                "probability": float(self.predicted_probability[i]),
                "probabilities": {str(name(c)): float(v) for c, v in enumerate(p[i])},
                "high_reliability": bool(self.in_hr[i]),
                "high_reliability_lower": bool(self.in_hr_lower[i]),
                "is_ood": bool(self.is_ood[i]),
                "q": int(self.q[i]),
                "d": float(self.d[i]),
                "d_nearest": float(self.d_nearest[i]),
                "rescaled_similarity": float(self.rescaled_similarity[i]),
                "d_lower": float(self.d_lower[i]),
                "probability_lower": float(p_lower[i][int(self.prediction[i])]),
                "nearest_index": int(self.nearest_index[i]),
            }
            if self.nearest_id is not None:
                row["nearest_id"] = self.nearest_id[i]
            if highest is not None and self.hr_alphas is not None and self.in_hr_at is not None:
                top = float(highest[i])
                row["high_reliability_alpha"] = None if math.isnan(top) else top
                row["high_reliability_at"] = dict(zip(tiers, self.in_hr_at[i].tolist()))
            rows.append(row)
        return rows


@dataclass
class LowerBound:
    """The lower-bound variant's quantities (all ``(B,)`` except ``probabilities`` ``(B, C)``)."""

    d_lower: torch.Tensor
    d_upper: torch.Tensor
    probabilities: torch.Tensor
    predicted_probability: torch.Tensor
    rescaled_similarity: torch.Tensor


def lower_bound(
    logits: torch.Tensor,
    prediction: torch.Tensor,
    q: torch.Tensor,
    d: torch.Tensor,
    effective_sample_size: torch.Tensor,
    alpha: float,
) -> LowerBound:
    """``d -/+ eps`` clipped to [0, 1], and ``sdm`` / ``q'`` recomputed with ``d_lower``.

    ``eps = max_c sqrt(ln(2 / (1 - alpha)) / (2 n_c))`` over the ``(B, C)`` effective sample sizes ``n_c``
    (capped at 1; 1 when some ``n_c = 0`` or ``alpha = 1``); ``logits (B, C)``, ``prediction``, ``q``, ``d`` ``(B,)``.
    """
    eps = lower_bound_margin(effective_sample_size, alpha)
    d_lower = (d - eps).clamp(0.0, 1.0)
    probabilities, predicted, rescaled = activate(logits, prediction, q, d_lower)
    return LowerBound(d_lower, (d + eps).clamp(0.0, 1.0), probabilities, predicted, rescaled)


def hr_masks(
    output: SDMOutput, alpha: float, q_min: float, thresholds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(in_hr (B,), in_hr_lower (B,))`` of ``output`` re-decided under ``alpha``'s ``q'_min`` and
    ``psi (C,)``, without a new neighbour search."""
    in_hr = high_reliability_mask(
        output.predicted_probability, output.prediction, output.rescaled_similarity, q_min, thresholds
    )
    low = lower_bound(output.logits, output.prediction, output.q, output.d, output.effective_sample_size, alpha)
    in_hr_lower = high_reliability_mask(
        low.predicted_probability, output.prediction, low.rescaled_similarity, q_min, thresholds
    )
    return in_hr, in_hr_lower


def with_alpha_levels(output: SDMOutput, calibration: CalibrationState, alphas: list[float] | None) -> SDMOutput:
    """``output`` with ``hr_alphas (A,)`` and ``in_hr_at (B, A)`` set for its own alpha and every one of
    ``alphas`` (Algorithm 1 rerun on the stored arrays); ``output`` itself when ``alphas`` is empty."""
    if not alphas:
        return output
    levels = sorted({float(calibration.alpha), *map(float, alphas)})
    columns = []
    for alpha in levels:
        state = calibration if alpha == calibration.alpha else with_alpha(calibration, alpha)
        columns.append(hr_masks(output, alpha, state.q_min, state.thresholds)[0])
    # float64: the exact tier values (float32 would turn 0.95 into 0.949999988)
    return replace(output, hr_alphas=torch.tensor(levels, dtype=torch.float64), in_hr_at=torch.stack(columns, dim=1))


def assemble_output(
    logits: torch.Tensor,
    prediction: torch.Tensor,
    similarity: SimilarityResult,
    d: torch.Tensor,
    calibration: CalibrationState,
    nearest_id: list | None = None,
    neighbor_indices: torch.Tensor | None = None,
    neighbor_distances: torch.Tensor | None = None,
) -> SDMOutput:
    """The full :class:`SDMOutput` of a batch (``hr_alphas`` / ``in_hr_at`` unset).

    Args:
        logits: ``(B, C)`` CPU float32 ``z'``; prediction: ``(B,)`` int64 ``y_hat``.
        similarity: the batch's ``q``, nearest rows and ``d_nearest``.
        d: ``(B,)`` float32 distance quantiles.
        calibration: the head's calibration (``q'_min``, ``psi``, ``alpha``, class-wise ``q'`` lists).
        nearest_id, neighbor_indices, neighbor_distances: optional explanation fields.
    """
    q = similarity.q
    probabilities, predicted, rescaled = activate(logits, prediction, q, d)
    in_hr = high_reliability_mask(predicted, prediction, rescaled, calibration.q_min, calibration.thresholds)
    ess = effective_sample_sizes(rescaled, calibration.rescaled_lists)
    low = lower_bound(logits, prediction, q, d, ess, calibration.alpha)
    in_hr_lower = high_reliability_mask(
        low.predicted_probability, prediction, low.rescaled_similarity, calibration.q_min, calibration.thresholds
    )
    return SDMOutput(
        logits=logits,
        prediction=prediction,
        probabilities=probabilities,
        q=q,
        d=d,
        d_nearest=similarity.d_nearest,
        nearest_index=similarity.nearest_index,
        rescaled_similarity=rescaled,
        is_ood=q == 0,
        in_hr=in_hr,
        effective_sample_size=ess,
        d_lower=low.d_lower,
        d_upper=low.d_upper,
        probabilities_lower=low.probabilities,
        rescaled_similarity_lower=low.rescaled_similarity,
        in_hr_lower=in_hr_lower,
        nearest_id=nearest_id,
        neighbor_indices=neighbor_indices,
        neighbor_distances=neighbor_distances,
    )
