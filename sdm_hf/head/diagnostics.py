"""What an SDM head can tell about itself, from its plain state: calibration report, label errors, index agreement."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..maths.activation import high_reliability_mask
from ..utils.counting import accuracy_or_none, format_accuracy, group_counts, label_names
from .inference import SDMOutput
from .region_diagnosis import RegionDiagnosis, diagnose_region
from .state import CalibrationState, thresholds_at

__all__ = ["CalibrationReport", "LabelErrors", "calibration_report", "label_errors", "output_agreement"]


@dataclass
class CalibrationReport:
    """Per-class summary of the HR region on the calibration set at one or more alphas (in-sample).

    ``rows``: one dict per (alpha, class): ``alpha``, ``class``, ``label``, ``n`` (points of that true
    class), ``ood``, ``admitted``, ``admitted_fraction`` (of ``n``), ``accuracy`` (class-conditional among
    admitted; None, shown "R", when none), ``predicted_admitted``, ``prediction_accuracy``
    (prediction-conditional), ``psi``, ``q_min``. ``str(report)``: a markdown table plus the diagnosis.
    """

    rows: list[dict]
    chosen_alpha: float
    diagnosis: RegionDiagnosis | None = None

    def to_dict(self) -> dict:
        """JSON-ready dict (non-finite floats become None)."""

        def clean(v):
            return None if isinstance(v, float) and not math.isfinite(v) else v

        return {
            "chosen_alpha": self.chosen_alpha,
            "rows": [{k: clean(v) for k, v in row.items()} for row in self.rows],
            "diagnosis": None if self.diagnosis is None else self.diagnosis.to_dict(),
        }

    def admitted_at(self, alpha: float | None = None) -> tuple[int, int]:
        """``(admitted, n)`` summed over classes at ``alpha`` (default: the chosen alpha)."""
        alpha = self.chosen_alpha if alpha is None else alpha
        rows = [r for r in self.rows if r["alpha"] == alpha]
        return sum(r["admitted"] for r in rows), sum(r["n"] for r in rows)

    def to_markdown(self) -> str:
        """The rows as a markdown table; ``*`` marks the chosen alpha."""
        head = "| alpha | class | n | OOD | q'_min | psi | HR admitted | class-cond. acc. | pred-cond. acc. |"
        lines = [head, "|" + "---|" * 9]
        for r in self.rows:
            q_min = "inf" if not math.isfinite(r["q_min"]) else f"{r['q_min']:.3f}"
            lines.append(
                f"| {r['alpha']:.2f}{' *' if r['alpha'] == self.chosen_alpha else ''} "
                f"| {r['label']} | {r['n']} | {r['ood']} | {q_min} | {r['psi']:.4f} "
                f"| {r['admitted']} ({r['admitted_fraction']:.1%}) | {format_accuracy(r['accuracy'])} "
                f"| {format_accuracy(r['prediction_accuracy'])} |"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        if self.diagnosis is None:
            return self.to_markdown()
        return self.to_markdown() + "\n\n" + str(self.diagnosis)


def calibration_report(
    calibration: CalibrationState,
    alphas: Iterable[float],
    id2label: dict[int, str] | None = None,
    selection: dict | None = None,
) -> CalibrationReport:
    """Per class: points, OOD count, HR admission and accuracy at the chosen alpha and each of ``alphas``
    (Algorithm 1 rerun on the stored arrays), with the :class:`RegionDiagnosis` at the chosen alpha
    (``selection``: the fit's ``head.selection``, for training advice)."""
    cal = calibration
    num_classes = len(cal.distance_lists)
    names = label_names(num_classes, id2label)
    predicted_p = cal.predicted_probability
    correct = cal.predictions == cal.labels
    ood = torch.bincount(cal.labels[cal.q == 0], minlength=num_classes).tolist()
    rows = []
    for alpha in sorted({cal.alpha, *alphas}):  # a handful of alphas, each vectorised over points
        if alpha == cal.alpha:
            q_min, psi = cal.q_min, cal.thresholds
        else:
            q_min, psi = thresholds_at(cal, alpha)
        admitted = high_reliability_mask(predicted_p, cal.predictions, cal.rescaled_similarity, q_min, psi)
        n, adm, right = (t.tolist() for t in group_counts(cal.labels, admitted, correct, num_classes))
        _, p_adm, p_right = (t.tolist() for t in group_counts(cal.predictions, admitted, correct, num_classes))
        for c in range(num_classes):
            rows.append(
                {
                    "alpha": alpha,
                    "class": c,
                    "label": names[c],
                    "n": n[c],
                    "ood": ood[c],
                    "admitted": adm[c],
                    "admitted_fraction": adm[c] / n[c] if n[c] else 0.0,
                    "accuracy": accuracy_or_none(right[c], adm[c]),
                    "predicted_admitted": p_adm[c],
                    "prediction_accuracy": accuracy_or_none(p_right[c], p_adm[c]),
                    "psi": float(psi[c]),
                    "q_min": float(q_min),
                }
            )
    diagnosis = diagnose_region(cal, cal.alpha, id2label, selection)
    lower = [
        a
        for a in sorted({r["alpha"] for r in rows})
        if a < cal.alpha and sum(r["admitted"] for r in rows if r["alpha"] == a) > 0
    ]
    if diagnosis.admitted == 0 and lower:
        share = sum(r["admitted"] for r in rows if r["alpha"] == lower[-1]) / max(len(cal.labels), 1)
        diagnosis.advice.append(f"at alpha={lower[-1]} the region admits {share:.1%} of the calibration points")
    return CalibrationReport(rows=rows, chosen_alpha=cal.alpha, diagnosis=diagnosis)


@dataclass
class LabelErrors:
    """Admitted (HR) points whose given label differs from the prediction, most confident first.

    All fields are ``(K,)`` tensors; ``index`` refers to the rows of the input.
    """

    index: torch.Tensor
    label: torch.Tensor
    prediction: torch.Tensor
    probability: torch.Tensor
    rescaled_similarity: torch.Tensor

    def __len__(self) -> int:
        return int(self.index.numel())

    def to_list(self, id2label: dict[int, str] | None = None) -> list[dict]:
        """One JSON-ready dict per candidate, with label names when ``id2label`` is given."""
        name = (lambda c: id2label[int(c)]) if id2label else (lambda c: int(c))
        return [
            {
                "index": int(i),
                "label": name(y),
                "prediction": name(p),
                "probability": float(s),
                "rescaled_similarity": float(r),
            }
            for i, y, p, s, r in zip(
                self.index, self.label, self.prediction, self.probability, self.rescaled_similarity
            )
        ]


def label_errors(output: SDMOutput, labels: torch.Tensor) -> LabelErrors:
    """The admitted rows of ``output`` whose given ``labels (B,)`` int64 differ from the prediction,
    sorted by ``(sdm(z')_{y_hat}, q')`` descending."""
    candidates = (output.in_hr & (output.prediction != labels)).nonzero().squeeze(1)
    probability = output.predicted_probability[candidates]
    rescaled = output.rescaled_similarity[candidates]
    # lexicographic descending order: secondary key first, then a stable primary sort
    order = torch.sort(rescaled, descending=True, stable=True).indices
    order = order[torch.sort(probability[order], descending=True, stable=True).indices]
    rows = candidates[order]
    return LabelErrors(
        index=rows,
        label=labels[rows],
        prediction=output.prediction[rows],
        probability=output.predicted_probability[rows],
        rescaled_similarity=output.rescaled_similarity[rows],
    )


def output_agreement(approximate: SDMOutput, reference: SDMOutput) -> dict:
    """Shares of rows on which two outputs for the same points agree (``same_q``, ``same_d``,
    ``same_nearest``, ``same_hr``, ``same_hr_lower``; 1.0 when empty) and ``n``."""
    n = len(reference)

    def share(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a == b).float().mean()) if n else 1.0

    return {
        "n": n,
        "same_q": share(approximate.q, reference.q),
        "same_d": share(approximate.d, reference.d),
        "same_nearest": share(approximate.nearest_index, reference.nearest_index),
        "same_hr": share(approximate.in_hr, reference.in_hr),
        "same_hr_lower": share(approximate.in_hr_lower, reference.in_hr_lower),
    }
