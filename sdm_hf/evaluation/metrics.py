"""Selective-classification reports: accuracy among admitted points, marginal, per TRUE class and per PREDICTED class.

The tables of Schmaltz (2025), Similarity-Distance-Magnitude Activations, arXiv:2509.12760. Proportions are over all
points; a group with nothing admitted has no accuracy: ``"R"`` (all rejected) in tables, ``None`` in JSON.
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
    """Result of :func:`selective_classification_report` over ``num_points`` points and classes named ``labels``.

    ``rows``: one dict per estimator with ``estimator``, ``marginal`` (``{admitted, proportion, accuracy}``, accuracy
    None when nothing is admitted), ``class_conditional`` and ``prediction_conditional`` (``[C]`` lists of such dicts).
    """

    rows: list[dict]
    num_points: int
    labels: list[str]

    def to_dict(self) -> dict:
        """JSON-ready ``{"num_points", "labels", "estimators": rows}``."""
        return {"num_points": self.num_points, "labels": self.labels, "estimators": self.rows}

    def to_markdown(self) -> str:
        """A markdown table: one row per estimator, cells ``accuracy (admitted share)`` or ``R``."""

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
        labels: ``[N]`` int true labels in ``0..C-1``.
        estimators: name -> ``(prediction [N] int, admit [N] bool)``.
        num_classes: ``C``.
        id2label: optional display names.

    Raises:
        ValueError: an estimator's arrays do not have the shape of ``labels``.

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
    """Raw counts of one selective classifier, per true and per predicted class (for significance checks and
    re-aggregation; ``admitted = 0`` is a group's "R").

    Args:
        labels: ``[N]`` int true labels in ``0..C-1``.
        prediction: ``[N]`` int predicted labels.
        admit: ``[N]`` bool, True where the point is admitted (not rejected).
        num_classes: ``C``.
        id2label: optional display names, the dict keys (default ``"0"``, ``"1"``, ...).

    Returns:
        ``{"n", "admitted", "correct", "per_class": {name: {"n", "admitted", "correct"}}, "per_prediction": {...}}``
        of Python ints; ``per_class`` groups by TRUE label, ``per_prediction`` by PREDICTED label.

    Raises:
        ValueError: arrays not 1-D of one length, or labels outside ``0..C-1``.

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
    """``sqrt(alpha (1 - alpha) / n)``, the standard error of an accuracy ``alpha`` over ``n`` points (``inf`` at 0)."""
    return math.sqrt(alpha * (1.0 - alpha) / n) if n > 0 else math.inf


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """Wilson (1927) score interval ``(low, high)`` of ``p = successes / n`` (z = 1.96: 95%); None for ``n = 0``.

    ``(center -/+ half) / (1 + z^2 / n)`` with ``center = p + z^2 / (2n)``, ``half = z sqrt(p (1 - p) / n + z^2 /
    (4 n^2))``: inside [0, 1] and not empty at ``p = 0`` or ``1``, unlike the normal approximation.

    Raises:
        TypeError: ``successes`` or ``n`` not an integer.
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
    """Whether ``correct / admitted < alpha - z sqrt(alpha (1 - alpha) / admitted)``, the statistical checks' rule;
    False for an empty group ("R").

    Example:
        >>> significantly_below(12, 16, 0.95), significantly_below(14, 16, 0.95)
        (True, False)
    """
    if admitted <= 0:
        return False
    return correct / admitted < alpha - z * binomial_standard_error(alpha, admitted)
