"""The state of an SDM head as plain data, and the calibration steps as pure functions.

What a head knows beyond its config is described by three dataclasses of CPU tensors (a live
head keeps the support set behind a FAISS index, built from :class:`SupportState`):

* :class:`SupportState` — the support set (training exemplars) as stored: vectors
  ``[N, M]`` in the storage dtype, true labels and predictions ``[N]``, optional ids/texts.
* :class:`CalibrationState` — the per-point calibration arrays and Algorithm 1's result.
* :class:`SDMHeadState` — config + module weights + the two above + the training selection.

:meth:`sdm_hf.SDMHead.to_state` / :meth:`sdm_hf.SDMHead.from_state` convert a head to and from
an :class:`SDMHeadState`; :mod:`sdm_hf.head.serialization` converts a state to and from files, and a
multi-process trainer sends it between processes. No module here touches FAISS or files.

Calibration, following Schmaltz (2025), *Similarity-Distance-Magnitude Activations*
(arXiv:2509.12760): for each held-out point with logits ``z'`` [C], similarity ``q`` and
nearest-exemplar distance, the distance quantile ``d`` is read from the class-wise eCDFs of
the calibration set's own nearest distances; ``sdm(z')`` is the change-of-base softmax
``(2 + q)^{d z'_i} / sum_j (2 + q)^{d z'_j}``; the rescaled similarity ``q'`` combines ``q``
with ``sdm(z')_{y_hat}``; Algorithm 1 then finds the smallest ``q'_min`` and class-wise
thresholds ``psi`` [C] at which every class's true-class probabilities above ``q'_min``
reach ``alpha`` at their ``(1 - alpha)`` quantile.
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
        vectors: ``[N, M]`` exemplars in the storage dtype (float32 or float16).
        labels: ``[N]`` int64 true labels.
        predictions: ``[N]`` int64 predictions of the head for those exemplars.
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
        labels, predictions: ``[N]`` int64 true labels and ``y_hat``.
        probabilities: ``[N, C]`` float32 ``sdm(z')``.
        q: ``[N]`` int64 similarity; d: ``[N]`` float32 distance quantile in ``[0, 1]``;
        d_nearest: ``[N]`` float32 squared L2 distance to the nearest exemplar.
        rescaled_similarity: ``[N]`` float32 ``q'``.
        features: ``[N, D]`` raw features (kept so that a recompute needs no input), or None.
        alpha: target accuracy; q_min: ``q'_min`` (``inf`` when the HR region is empty);
        thresholds: ``[C]`` float64 ``psi``.
        distance_lists: C sorted float32 tensors, the class-wise nearest distances (the eCDFs
            ``d`` is read from).
        rescaled_lists: C sorted float64 tensors of the calibration ``q'`` per class (for the
            effective sample sizes).
        stale: True after the support set grew and before the next recompute.
        min_class_points: the small-region guard Algorithm 1 runs with (``SDMConfig``'s
            ``min_class_points``: 0, an integer or ``"auto"``).
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
        """``[N]`` ``sdm(z')_y``."""
        return self.probabilities.gather(1, self.labels.view(-1, 1)).squeeze(1)

    @property
    def predicted_probability(self) -> torch.Tensor:
        """``[N]`` ``sdm(z')_{y_hat}``."""
        return self.probabilities.gather(1, self.predictions.view(-1, 1)).squeeze(1)

    def arrays(self) -> dict[str, torch.Tensor]:
        """Copies of the per-point arrays, keyed by name."""
        names = ("labels", "predictions", "probabilities", "q", "d", "d_nearest", "rescaled_similarity")
        return {name: getattr(self, name).clone() for name in names}


@dataclass
class SDMHeadState:
    """A whole head as plain data: enough to rebuild its predictions exactly (the FAISS index is
    rebuilt from ``support.vectors``; ``training_history`` and cached search results are not
    part of it).

    Attributes:
        config: the :class:`~sdm_hf.SDMConfig`.
        weights: the module's ``state_dict`` (adaptor, classifier, normalisation buffers).
        support: the support set, or None before ``build_support``.
        calibration: the calibration, or None before ``calibrate``.
        selection: which shuffle/epoch training kept (``shuffle``, ``epoch``,
            ``calibration_loss``; in memory also ``support_rows`` / ``calibration_rows``), or None.
    """

    config: SDMConfig
    weights: dict[str, torch.Tensor]
    support: SupportState | None = None
    calibration: CalibrationState | None = None
    selection: dict | None = None


def weight_shapes(config: SDMConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every float32 tensor in the ``state_dict`` of a head with ``config``:
    the adaptor ``R^D -> R^M``, the classifier ``R^M -> R^C`` and the normalisation buffers
    (scalars, or ``[D]`` with ``normalization="feature"``)."""
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
        logits: ``[B, C]`` ``z'``; prediction: ``[B]`` ``y_hat``; q: ``[B]`` int64; d: ``[B]``.

    Returns:
        ``(probabilities [B, C], predicted_probability [B], rescaled_similarity [B])``:
        ``sdm(z')``, ``sdm(z')_{y_hat}`` and ``q'``.
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
        labels: ``[N]`` true labels; logits: ``[N, C]`` ``z'``; q: ``[N]`` int64 similarity;
        d_nearest: ``[N]`` squared distance to the nearest support exemplar.
        num_classes: ``C``; alpha: target accuracy, ``0.5 < alpha <= 1``.
        features: ``[N, D]`` raw features to keep for a later recompute, or None.
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
    """``state`` with Algorithm 1 (and its small-region guard) rerun at ``alpha`` on its stored
    arrays (a new object); ``min_class_points`` replaces the state's guard setting when given."""
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
