"""Selective-classification tables (SPEC C3).

For each estimator (a prediction and an admit mask over the same labelled points):
class-conditional accuracy and admitted proportion (points whose TRUE label is c),
prediction-conditional accuracy and admitted proportion (points PREDICTED c), marginal
accuracy and admission rate ``n / |D|``. Proportions are over all ``|D|`` points. An
estimator that admits nothing in a group is reported as ``"R"`` (all rejected), never as
accuracy 0 or NaN; in JSON its accuracy is ``null``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "selective_classification_report",
    "SelectiveClassificationReport",
    "evaluate_module_path",
    "selective_counts",
    "significantly_below",
    "binomial_standard_error",
]


def evaluate_module_path() -> str:
    """Folder of the optional `evaluate` metric module (``evaluate.load(evaluate_module_path())``)."""
    from importlib import resources

    return str(resources.files("sdm_hf").joinpath("evaluate_metrics/selective_classification"))


def _group(correct: torch.Tensor, admitted: torch.Tensor, member: torch.Tensor, total: int) -> dict:
    n = int((admitted & member).sum())
    return {
        "admitted": n,
        "proportion": n / total if total else 0.0,
        "accuracy": float((admitted & member & correct).sum()) / n if n else None,
    }


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
                return "R"
            return f"{g['accuracy']:.3f} ({g['proportion']:.1%})"

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
    labels,
    estimators: dict[str, tuple],
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
    names = [id2label[c] if id2label else str(c) for c in range(num_classes)]
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
        everyone = torch.ones_like(admit)
        rows.append(
            {
                "estimator": name,
                "marginal": _group(correct, admit, everyone, total),
                "class_conditional": [_group(correct, admit, y == c, total) for c in range(num_classes)],
                "prediction_conditional": [_group(correct, admit, prediction == c, total) for c in range(num_classes)],
            }
        )
    return SelectiveClassificationReport(rows=rows, num_points=total, labels=names)


def selective_counts(labels, prediction, admit, num_classes: int, id2label: dict[int, str] | None = None) -> dict:
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
    correct = admit & (prediction == y)
    names = [id2label[c] if id2label else str(c) for c in range(num_classes)]

    # one bincount per quantity: no Python loop over points
    def per(group: torch.Tensor) -> dict:
        n = torch.bincount(group, minlength=num_classes)
        a = torch.bincount(group[admit], minlength=num_classes)
        k = torch.bincount(group[correct], minlength=num_classes)
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
