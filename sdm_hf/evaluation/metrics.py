"""Selective-classification reporting: the one place accuracy and admission are counted.

A selective classifier predicts ``y_hat`` and admits (does not reject) some points. Over one
labelled set of ``|D|`` points this module reports, per group:

* class-conditional (points whose TRUE label is c) and prediction-conditional (points
  PREDICTED c) accuracy among the admitted, and the admitted proportion ``n / |D|``;
* the marginal accuracy and admission rate.

A group with nothing admitted has no accuracy: it is reported as ``"R"`` (all rejected) in
tables and ``None`` in JSON, never as 0 or NaN. The counting core (:mod:`sdm_hf.utils.counting`:
``group_counts``, one ``bincount`` per quantity, ``accuracy_or_none``, ``format_accuracy``,
``label_names``) is shared with the SDM head's calibration report and model card. These are
the tables of Schmaltz (2025), *Similarity-Distance-Magnitude Activations* (arXiv:2509.12760).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..utils.counting import accuracy_or_none, format_accuracy, group_counts, label_names
from ..utils.validation import ArrayLike, LabelsLike

__all__ = [
    "selective_classification_report",
    "SelectiveClassificationReport",
    "evaluate_module_path",
    "selective_counts",
    "significantly_below",
    "binomial_standard_error",
    "wilson_interval",
]


def evaluate_module_path() -> str:
    """Folder of the optional `evaluate` metric module (``evaluate.load(evaluate_module_path())``)."""
    from importlib import resources

    return str(resources.files("sdm_hf.evaluation").joinpath("evaluate_metrics/selective_classification"))


def _groups(groups: torch.Tensor, admit: torch.Tensor, correct: torch.Tensor, num_classes: int, total: int):
    """Report dicts ``{admitted, proportion, accuracy}`` of every group, over ``total`` points."""
    _, admitted, right = group_counts(groups, admit, correct, num_classes)
    return [
        {
            "admitted": int(a),
            "proportion": int(a) / total if total else 0.0,
            "accuracy": accuracy_or_none(int(k), int(a)),
        }
        for a, k in zip(admitted.tolist(), right.tolist())
    ]


@dataclass
class SelectiveClassificationReport:
    """Rows of :func:`selective_classification_report`: one dict per estimator with keys
    ``estimator``, ``marginal`` ({admitted, proportion, accuracy}), ``class_conditional``
    and ``prediction_conditional`` (lists over classes of the same dicts)."""

    rows: list[dict]
    num_points: int
    labels: list[str]

    def to_dict(self) -> dict:
        return {"num_points": self.num_points, "labels": self.labels, "estimators": self.rows}

    def to_markdown(self) -> str:
        def cell(g):
            if g["accuracy"] is None:
                return format_accuracy(None)
            return f"{format_accuracy(g['accuracy'])} ({g['proportion']:.1%})"

        cols = [f"y={name}" for name in self.labels] + [f"ŷ={name}" for name in self.labels]
        lines = [
            "| estimator | marginal acc. (admitted) | " + " | ".join(cols) + " |",
            "|" + "---|" * (2 + len(cols)),
        ]
        for row in self.rows:
            cells = [cell(g) for g in row["class_conditional"] + row["prediction_conditional"]]
            lines.append(f"| {row['estimator']} | {cell(row['marginal'])} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def selective_classification_report(
    labels: LabelsLike,
    estimators: Mapping[str, tuple[ArrayLike, ArrayLike]],
    num_classes: int,
    id2label: dict[int, str] | None = None,
) -> SelectiveClassificationReport:
    """Accuracy and admission of selective classifiers on one labelled set.

    Args:
        labels: ``[N]`` true labels.
        estimators: name -> ``(prediction [N], admit [N] bool)``.
        num_classes: ``C``.
        id2label: optional display names.

    Example:
        >>> import torch
        >>> r = selective_classification_report(torch.tensor([0, 1, 1]),
        ...     {"all": (torch.tensor([0, 1, 0]), torch.tensor([True, True, True]))}, 2)
        >>> r.rows[0]["marginal"]["accuracy"]
        0.6666666666666666
    """
    y = torch.as_tensor(labels).long().cpu()
    total = int(y.numel())
    names = label_names(num_classes, id2label)
    rows = []
    for name, (prediction, admit) in estimators.items():
        prediction = torch.as_tensor(prediction).long().cpu()
        admit = torch.as_tensor(admit).bool().cpu()
        if prediction.shape != y.shape or admit.shape != y.shape:
            raise ValueError(
                f"estimator {name!r}: prediction and admit must have shape {tuple(y.shape)}, got "
                f"{tuple(prediction.shape)} and {tuple(admit.shape)}"
            )
        correct = prediction == y
        everyone = torch.zeros_like(y)
        rows.append(
            {
                "estimator": name,
                "marginal": _groups(everyone, admit, correct, 1, total)[0],
                "class_conditional": _groups(y, admit, correct, num_classes, total),
                "prediction_conditional": _groups(prediction, admit, correct, num_classes, total),
            }
        )
    return SelectiveClassificationReport(rows=rows, num_points=total, labels=names)


def selective_counts(
    labels: LabelsLike,
    prediction: LabelsLike,
    admit: ArrayLike,
    num_classes: int,
    id2label: dict[int, str] | None = None,
) -> dict:
    """Raw counts of one selective classifier, per true class and per predicted class.

    Counts (not rates) are what later significance checks and re-aggregation need; an
    admitted count of 0 is the "R" (all rejected) case of that group.

    Args:
        labels: ``[N]`` true labels ``0..C-1``.
        prediction: ``[N]`` predicted labels.
        admit: ``[N]`` bool, True where the estimator admits (does not reject) the point.
        num_classes: ``C``.
        id2label: optional display names, used as the dict keys (default ``"0"``, ``"1"``, ...).

    Returns:
        ``{"n", "admitted", "correct", "per_class": {name: {"n", "admitted", "correct"}},
        "per_prediction": {name: {"n", "admitted", "correct"}}}`` of Python ints, where
        ``per_class[c]`` groups the points whose TRUE label is c (class-conditional) and
        ``per_prediction[c]`` those PREDICTED c (prediction-conditional).

    Example:
        >>> import torch
        >>> c = selective_counts(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]),
        ...                      torch.tensor([True, True, False]), 2, {0: "no", 1: "yes"})
        >>> c["per_class"]["yes"], c["per_prediction"]["no"]
        ({'n': 2, 'admitted': 1, 'correct': 1}, {'n': 2, 'admitted': 1, 'correct': 1})
    """
    y = torch.as_tensor(labels).long().cpu()
    prediction = torch.as_tensor(prediction).long().cpu()
    admit = torch.as_tensor(admit).bool().cpu()
    if prediction.shape != y.shape or admit.shape != y.shape or y.dim() != 1:
        raise ValueError(
            f"labels, prediction and admit must be 1-D of one length, got {tuple(y.shape)}, "
            f"{tuple(prediction.shape)} and {tuple(admit.shape)}"
        )
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must be integers in 0..{num_classes - 1}, got values {int(y.min())}..{int(y.max())}")
    correct = admit & (prediction == y)
    names = label_names(num_classes, id2label)

    def per(group: torch.Tensor) -> dict:
        n, a, k = group_counts(group, admit, correct, num_classes)
        return {names[c]: {"n": int(n[c]), "admitted": int(a[c]), "correct": int(k[c])} for c in range(num_classes)}

    return {
        "n": int(y.numel()),
        "admitted": int(admit.sum()),
        "correct": int(correct.sum()),
        "per_class": per(y),
        "per_prediction": per(prediction.clamp(0, num_classes - 1)),
    }


def binomial_standard_error(alpha: float, n: int) -> float:
    """``sqrt(alpha (1 - alpha) / n)``: the standard error of an accuracy over ``n`` points
    whose true accuracy is ``alpha`` (``inf`` for ``n = 0``)."""
    return math.sqrt(alpha * (1.0 - alpha) / n) if n > 0 else math.inf


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """Wilson score interval of a binomial proportion ``successes / n`` (z = 1.96: 95%).

    ``(center -/+ half) / (1 + z^2 / n)`` with ``center = p + z^2 / (2n)`` and
    ``half = z sqrt(p (1 - p) / n + z^2 / (4 n^2))``; unlike the normal approximation it stays
    inside [0, 1] and is not empty at ``p = 0`` or ``1`` (Wilson 1927). None for ``n = 0``.

    Raises:
        ValueError: ``n < 0``, ``successes`` outside ``0..n`` or ``z <= 0``.

    Example:
        >>> low, high = wilson_interval(9, 10)
        >>> round(low, 3), round(high, 3)
        (0.596, 0.982)
    """
    if isinstance(n, bool) or isinstance(successes, bool) or int(n) != n or int(successes) != successes:
        raise TypeError(f"successes and n must be integers, got {successes!r} and {n!r}")
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if not z > 0:
        raise ValueError(f"z must be > 0, got {z}")
    if n == 0:
        return None
    p = successes / n
    scale = 1.0 + z * z / n
    center = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n))
    return max(0.0, (center - half) / scale), min(1.0, (center + half) / scale)


def significantly_below(correct: int, admitted: int, alpha: float, z: float = 2.0) -> bool:
    """True when an observed accuracy ``correct / admitted`` lies more than ``z`` binomial
    standard errors below ``alpha``: ``correct / admitted < alpha - z sqrt(alpha (1 - alpha) / admitted)``.

    This is the rule the statistical checks use ("more than two binomial standard errors below
    alpha"); with few admitted points nothing is significant, and an empty group ("R") never is.

    Example:
        >>> significantly_below(12, 16, 0.95), significantly_below(14, 16, 0.95)
        (True, False)
    """
    if admitted <= 0:
        return False
    return correct / admitted < alpha - z * binomial_standard_error(alpha, admitted)
