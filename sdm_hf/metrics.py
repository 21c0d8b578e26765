"""Selective-classification tables (SPEC C3).

For each estimator (a prediction and an admit mask over the same labelled points):
class-conditional accuracy and admitted proportion (points whose TRUE label is c),
prediction-conditional accuracy and admitted proportion (points PREDICTED c), marginal
accuracy and admission rate ``n / |D|``. Proportions are over all ``|D|`` points. An
estimator that admits nothing in a group is reported as ``"R"`` (all rejected), never as
accuracy 0 or NaN; in JSON its accuracy is ``null``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["selective_classification_report", "SelectiveClassificationReport", "evaluate_module_path"]


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
