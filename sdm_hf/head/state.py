"""The state of an SDM head as plain CPU tensors, and the calibration steps as pure functions.

:class:`SupportState`, :class:`CalibrationState` and :class:`SDMHeadState` are what
:meth:`sdm_hf.SDMHead.to_state` / ``from_state`` convert to and from; nothing here touches FAISS or files.

Schmaltz (2025), Similarity-Distance-Magnitude Activations, arXiv:2509.12760, Algorithm 1:
``sdm(z')_i = (2 + q)^{d z'_i} / sum_j (2 + q)^{d z'_j}``, ``q' = min(q, (2 + q)^{sdm(z')_{y_hat}})``, and
``(q'_min, psi)`` the smallest ``q'`` threshold above which every class's true-class probabilities reach
``alpha`` at their ``(1 - alpha)`` quantile (derivation: docs/how_sdm_works.md, section 'The high-reliability
region (Algorithm 1)').
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..maths.activation import rescaled_similarity, sdm_activation
from ..maths.calibration import (
    class_rescaled_lists,
    explain_empty_region,
    high_reliability_thresholds,
    minimum_class_points,
)
from ..maths.distance import class_distance_lists, distance_quantile
from .config import SDMConfig

__all__ = [
    "SupportState",
    "CalibrationState",
    "SDMHeadState",
    "weight_shapes",
    "activate",
    "calibrate",
    "with_alpha",
    "thresholds_at",
]


@dataclass
class SupportState:
    """The support set as plain tensors (what is saved and what rebuilds the index).

    Attributes:
        vectors: ``(N, M)`` exemplars, float32 or float16 (the storage dtype).
        labels, predictions: ``(N,)`` int64 true labels and the head's predictions.
        ids, texts: optional per-row document ids / texts (length ``N``), else None.
    """

    vectors: torch.Tensor
    labels: torch.Tensor
    predictions: torch.Tensor
    ids: list | None = None
    texts: list | None = None

    @property
    def size(self) -> int:
        return int(self.labels.numel())


@dataclass
class CalibrationState:
    """Per-point calibration arrays and Algorithm 1's result (all CPU tensors).

    Attributes:
        labels, predictions: ``(N,)`` int64 true labels and ``y_hat``.
        probabilities: ``(N, C)`` float32 ``sdm(z')``.
        q: ``(N,)`` int64; d: ``(N,)`` float32 in ``[0, 1]``; d_nearest: ``(N,)`` float32 squared L2.
        rescaled_similarity: ``(N,)`` float32 ``q'``.
        features: ``(N, D)`` raw features (for a recompute without input), or None.
        alpha: target accuracy; q_min: ``q'_min`` (``inf``: empty HR region); thresholds: ``(C,)`` float64 ``psi``.
        distance_lists: C sorted float32 tensors of class-wise nearest distances (the eCDFs of ``d``).
        rescaled_lists: C sorted float64 tensors of calibration ``q'`` per class (effective sample sizes).
        stale: True after the support set grew, until the next recompute.
        min_class_points: the small-region guard (0, an integer or ``"auto"``).
    """

    labels: torch.Tensor
    predictions: torch.Tensor
    probabilities: torch.Tensor
    q: torch.Tensor
    d: torch.Tensor
    d_nearest: torch.Tensor
    rescaled_similarity: torch.Tensor
    features: torch.Tensor | None
    alpha: float
    q_min: float
    thresholds: torch.Tensor
    distance_lists: list[torch.Tensor]
    rescaled_lists: list[torch.Tensor]
    stale: bool = False
    min_class_points: int | str = 0

    @property
    def size(self) -> int:
        return int(self.labels.numel())

    def explain_empty(self, num_classes: int, id2label: dict[int, str] | None = None) -> str:
        """Why Algorithm 1 found no threshold on these arrays, in plain words."""
        return explain_empty_region(
            self.true_class_probability,
            self.rescaled_similarity,
            self.labels,
            num_classes,
            self.alpha,
            id2label,
            min_points=minimum_class_points(self.min_class_points, self.alpha),
        )

    @property
    def is_empty_region(self) -> bool:
        """True when Algorithm 1 found no threshold (the head admits nothing)."""
        return not math.isfinite(self.q_min)

    @property
    def true_class_probability(self) -> torch.Tensor:
        """``(N,)`` ``sdm(z')_y``."""
        return self.probabilities.gather(1, self.labels.view(-1, 1)).squeeze(1)

    @property
    def predicted_probability(self) -> torch.Tensor:
        """``(N,)`` ``sdm(z')_{y_hat}``."""
        return self.probabilities.gather(1, self.predictions.view(-1, 1)).squeeze(1)

    def arrays(self) -> dict[str, torch.Tensor]:
        """Copies of the per-point arrays, keyed by name."""
        names = ("labels", "predictions", "probabilities", "q", "d", "d_nearest", "rescaled_similarity")
        return {name: getattr(self, name).clone() for name in names}


@dataclass
class SDMHeadState:
    """A whole head as plain data, enough to rebuild its predictions exactly (not ``training_history``).

    Attributes:
        config: the :class:`~sdm_hf.SDMConfig`.
        weights: the module's ``state_dict`` (adaptor, classifier, normalisation buffers).
        support: the support set, or None before ``build_support``.
        calibration: the calibration, or None before ``calibrate``.
        selection: what training kept (``shuffle``, ``epoch``, ``calibration_loss``, row indices), or None.
    """

    config: SDMConfig
    weights: dict[str, torch.Tensor]
    support: SupportState | None = None
    calibration: CalibrationState | None = None
    selection: dict | None = None


def weight_shapes(config: SDMConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every float32 tensor in the ``state_dict`` of a head with ``config``
    (normalisation buffers are scalars, or ``(D,)`` with ``normalization="feature"``)."""
    d, m, c = config.input_dim, config.exemplar_dim, config.num_classes
    norm = () if config.normalization == "scalar" else (d,)
    return {
        "feature_mean": norm,
        "feature_std": norm,
        "adaptor.weight": (m, d),
        "adaptor.bias": (m,),
        "classifier.weight": (c, m),
        "classifier.bias": (c,),
    }


def activate(
    logits: torch.Tensor, prediction: torch.Tensor, q: torch.Tensor, d: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SDM activation and the rescaled similarity of a batch.

    Args:
        logits: ``(B, C)`` float ``z'``; prediction: ``(B,)`` int64 ``y_hat``; q: ``(B,)`` int64; d: ``(B,)`` float.

    Returns:
        ``(sdm(z') (B, C), sdm(z')_{y_hat} (B,), q' (B,))``.
    """
    probabilities = sdm_activation(logits, q.float(), d)
    predicted = probabilities.gather(1, prediction.view(-1, 1)).squeeze(1)
    return probabilities, predicted, rescaled_similarity(q, predicted)


def calibrate(
    labels: torch.Tensor,
    logits: torch.Tensor,
    q: torch.Tensor,
    d_nearest: torch.Tensor,
    num_classes: int,
    alpha: float,
    features: torch.Tensor | None = None,
    min_class_points: int | str = 0,
) -> CalibrationState:
    """The calibration state of held-out points, with Algorithm 1 run at ``alpha``.

    Args:
        labels: ``(N,)`` int64 true labels; logits: ``(N, C)`` float ``z'``; q: ``(N,)`` int64.
        d_nearest: ``(N,)`` float squared L2 distance to the nearest support exemplar.
        num_classes: ``C``; alpha: target accuracy, ``0.5 < alpha <= 1``.
        features: ``(N, D)`` raw features to keep for a later recompute, or None.
        min_class_points: the small-region guard (0: off; an integer; ``"auto"``).

    Returns:
        A :class:`CalibrationState`; ``q_min`` is ``inf`` when no threshold exists.
    """
    prediction = logits.argmax(dim=1)
    lists = class_distance_lists(d_nearest, labels, q, num_classes)
    d = distance_quantile(d_nearest, lists)
    probabilities, _, rescaled = activate(logits, prediction, q, d)
    state = CalibrationState(
        labels=labels,
        predictions=prediction,
        probabilities=probabilities,
        q=q,
        d=d,
        d_nearest=d_nearest,
        rescaled_similarity=rescaled,
        features=features,
        alpha=alpha,
        q_min=math.inf,
        thresholds=torch.zeros(num_classes, dtype=torch.float64),
        distance_lists=lists,
        rescaled_lists=class_rescaled_lists(rescaled, labels, num_classes),
        min_class_points=min_class_points,
    )
    return with_alpha(state, alpha)


def with_alpha(state: CalibrationState, alpha: float, min_class_points: int | str | None = None) -> CalibrationState:
    """A new ``state`` with Algorithm 1 rerun at ``alpha`` on its stored arrays (``min_class_points``, when
    given, replaces its guard)."""
    if min_class_points is not None:
        state = replace(state, min_class_points=min_class_points)
    q_min, thresholds = thresholds_at(state, alpha)
    return replace(state, alpha=alpha, q_min=q_min, thresholds=thresholds)


def thresholds_at(state: CalibrationState, alpha: float) -> tuple[float, torch.Tensor]:
    """``(q'_min, psi)`` of Algorithm 1 with the state's small-region guard at ``alpha``."""
    return high_reliability_thresholds(
        state.true_class_probability,
        state.rescaled_similarity,
        state.labels,
        len(state.distance_lists),
        alpha,
        minimum_class_points(state.min_class_points, alpha),
    )
