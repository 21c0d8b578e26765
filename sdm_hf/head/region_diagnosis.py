"""Why is the HR region small? A per-class diagnosis from the calibration arrays.

Schmaltz (2025), Similarity-Distance-Magnitude Activations, arXiv:2509.12760, Algorithm 1 admits above the
smallest ``q'`` threshold ``t`` at which every class ``c`` has at most ``min(floor((1 - alpha) n_c(t)), n_c(t) - 1)``
of its ``n_c(t)`` non-OOD points with ``q' >= t`` below ``alpha`` in true-class probability; the class needing the
highest ``t`` limits the region. Telling a class's share ``h`` of points at or above ``alpha`` from ``alpha`` at two
binomial standard errors takes ``n_needed = 4 h (1 - h) / (h - alpha)^2`` points (``h > alpha``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..maths.activation import high_reliability_mask, is_out_of_distribution
from ..maths.calibration import (
    high_reliability_thresholds,
    minimum_class_points,
    quantile_index,
    required_points_per_class,
    suffix_counts,
)
from ..utils.counting import label_names
from .state import CalibrationState, thresholds_at

__all__ = ["RegionDiagnosis", "diagnose_region", "points_needed"]


@dataclass
class RegionDiagnosis:
    """What limits the HR region at one alpha (in-sample, on the calibration set).

    Attributes:
        alpha: the alpha diagnosed; q_min: Algorithm 1's ``q'_min`` there (``inf``: empty region).
        n: calibration points; admitted: those in the HR region (``admitted_share = admitted / n``).
        limiting_class: the class whose own condition needs the highest threshold (first on a tie).
        classes: one dict per class: ``label``, ``n``, ``non_ood``, ``accuracy`` (on the non-OOD points),
            ``hit_rate`` (share of non-OOD points with true-class probability ``>= alpha``), ``threshold``
            (smallest ``q'`` where its own condition holds; ``inf``: none), ``region_n`` / ``region_hit_rate``
            (its points with ``q' >= threshold``, their share ``>= alpha``), ``points_needed`` (``n_needed`` at
            ``h = region_hit_rate``, rounded up; None when ``h <= alpha`` or no threshold), ``too_few``
            (fewer non-OOD points than ``1 / (1 - alpha)``).
        advice: plain-language suggestions, most useful first.
    """

    alpha: float
    n: int
    admitted: int
    q_min: float
    limiting_class: int | None
    classes: list[dict]
    advice: list[str] = field(default_factory=list)

    @property
    def admitted_share(self) -> float:
        return self.admitted / self.n if self.n else 0.0

    def to_dict(self) -> dict:
        """JSON-ready dict (non-finite floats become None)."""

        def clean(v):
            return None if isinstance(v, float) and not math.isfinite(v) else v

        return {
            "alpha": self.alpha,
            "n": self.n,
            "admitted": self.admitted,
            "admitted_share": self.admitted_share,
            "q_min": clean(self.q_min),
            "limiting_class": self.limiting_class,
            "classes": [{k: clean(v) for k, v in c.items()} for c in self.classes],
            "advice": list(self.advice),
        }

    def __str__(self) -> str:
        lines = [
            f"HR region at alpha={self.alpha}: {self.admitted} of {self.n} calibration points "
            f"({self.admitted_share:.1%})."
        ]
        if self.limiting_class is not None:
            c = self.classes[self.limiting_class]
            others = "; ".join(
                f"{o['label']}: {_holds(o['threshold'])}"
                for i, o in enumerate(self.classes)
                if i != self.limiting_class
            )
            lines.append(f"Limiting class: {c['label']} (its own condition {_holds(c['threshold'])}; {others}).")
        for c in self.classes:
            lines.append(f"  {c['label']}: {_class_line(c)}")
        lines += [f"- {a}" for a in self.advice]
        return "\n".join(lines)


def _class_line(c: dict) -> str:
    counts = f"{c['n']} points ({c['non_ood']} not OOD)"
    overall = "n/a" if c["hit_rate"] is None else f"{c['hit_rate']:.3f}"
    if not math.isfinite(c["threshold"]):
        return (
            f"{counts}, share >= alpha {overall}: at no similarity threshold does the share reach what alpha "
            "needs; more data of the same kind will not change that"
        )
    need = (
        "too few to tell from alpha"
        if c["points_needed"] is None
        else f"about {c['points_needed']} points needed to tell it from alpha at 2 SE"
    )
    return (
        f"{counts}; from q' >= {c['threshold']:.3g}: {c['region_n']} points, share >= alpha "
        f"{c['region_hit_rate']:.3f} ({overall} overall): {need}"
    )


def _holds(t: float) -> str:
    return "holds at no threshold" if not math.isfinite(t) else f"holds from q' >= {t:.3g}"


def points_needed(hit_rate: float | None, alpha: float) -> int | None:
    """``ceil(4 h (1 - h) / (h - alpha)^2)`` with ``h = hit_rate``: points of one class for ``h`` to sit two
    binomial standard errors above ``alpha``; at least ``ceil(1 / (1 - alpha))``, None when ``h <= alpha``."""
    if hit_rate is None or hit_rate <= alpha:
        return None
    return max(
        math.ceil(4.0 * hit_rate * (1.0 - hit_rate) / (hit_rate - alpha) ** 2 - 1e-9), required_points_per_class(alpha)
    )


def diagnose_region(
    calibration: CalibrationState,
    alpha: float | None = None,
    id2label: dict[int, str] | None = None,
    selection: dict | None = None,
) -> RegionDiagnosis:
    """Which class limits the HR region at ``alpha``, how many points each would need, and what to try.

    Args:
        calibration: the head's calibration arrays.
        alpha: the alpha to diagnose (default: the calibrated one).
        id2label: class names for the text.
        selection: ``head.selection`` of a freshly fitted head, for training advice; None skips it.

    Returns:
        A :class:`RegionDiagnosis` (``str()``: a short paragraph) whose ``admitted`` and ``q_min`` are
        Algorithm 1's at ``alpha``.
    """
    cal = calibration
    alpha = float(cal.alpha if alpha is None else alpha)
    num_classes = len(cal.distance_lists)
    names = label_names(num_classes, id2label)
    keep = ~is_out_of_distribution(cal.rescaled_similarity)
    p = cal.true_class_probability[keep]
    r = cal.rescaled_similarity.double()[keep]
    y = cal.labels[keep]
    correct = (cal.predictions == cal.labels)[keep]
    hit = p.float() >= torch.tensor(alpha, dtype=torch.float32)
    candidates = torch.unique(r)  # sorted ascending
    guard = minimum_class_points(cal.min_class_points, alpha)
    y_all = cal.labels
    classes, own = [], []
    for c in range(num_classes):  # a loop over classes, not points
        in_c = y == c
        sorted_r = torch.sort(r[in_c]).values
        n_t = suffix_counts(sorted_r, candidates)
        below_t = suffix_counts(torch.sort(r[in_c & ~hit]).values, candidates)
        own.append((n_t >= max(1, guard)) & (below_t <= quantile_index(n_t, alpha)))
        n_c = int(in_c.sum())
        threshold = _first(own[c], candidates)
        hit_rate = float(hit[in_c].double().mean()) if n_c else None
        region = in_c & (r >= threshold)
        n_region = int(region.sum())
        region_rate = float(hit[region].double().mean()) if n_region else None
        classes.append(
            {
                "label": names[c],
                "n": int((y_all == c).sum()),
                "non_ood": n_c,
                "accuracy": float(correct[in_c].double().mean()) if n_c else None,
                "hit_rate": hit_rate,
                "threshold": threshold,
                "region_n": n_region,
                "region_hit_rate": region_rate,
                "points_needed": points_needed(region_rate, alpha),
                "too_few": n_c < required_points_per_class(alpha),
            }
        )
    thresholds = [c["threshold"] for c in classes]
    limiting = max(range(num_classes), key=lambda c: thresholds[c]) if num_classes else None
    q_min, psi = thresholds_at(cal, alpha)
    admitted = high_reliability_mask(cal.predicted_probability, cal.predictions, cal.rescaled_similarity, q_min, psi)
    diagnosis = RegionDiagnosis(
        alpha=alpha,
        n=int(cal.labels.numel()),
        admitted=int(admitted.sum()) if math.isfinite(q_min) else 0,
        q_min=q_min,
        limiting_class=limiting,
        classes=classes,
    )
    diagnosis.advice = _advice(diagnosis, selection)
    if guard > 1 and not math.isfinite(q_min):
        unguarded, _ = high_reliability_thresholds(
            cal.true_class_probability, cal.rescaled_similarity, cal.labels, num_classes, alpha
        )
        if math.isfinite(unguarded):
            diagnosis.advice.insert(
                0,
                f"the small-region guard (min_class_points: {guard} per class) emptied the region: without it "
                f"Algorithm 1 would admit points above q'={unguarded:.4g}, where some class has fewer than {guard} "
                "calibration points, too few for its accuracy to be trusted; more calibration data is the remedy",
            )
    return diagnosis


def _first(works: torch.Tensor, candidates: torch.Tensor) -> float:
    hits = works.nonzero()
    return float(candidates[int(hits[0, 0])]) if hits.numel() else math.inf


def _advice(d: RegionDiagnosis, selection: dict | None) -> list[str]:
    advice = []
    few = [c for c in d.classes if c["too_few"]]
    if few:
        advice.append(
            "add calibration data for "
            + ", ".join(f"{c['label']} ({c['n']} non-OOD points)" for c in few)
            + f": alpha={d.alpha} needs at least {required_points_per_class(d.alpha)} per class"
        )
    short = [c for c in d.classes if c["points_needed"] is not None and c["points_needed"] > c["region_n"]]
    if short:
        advice.append(
            "add calibration data for "
            + ", ".join(
                f"{c['label']} (has {c['region_n']} from q' >= {c['threshold']:.3g}, about {c['points_needed']} needed)"
                for c in short
            )
            + ": at the observed rate a region this small may hold below alpha on new data"
        )
    nowhere = [c for c in d.classes if c["non_ood"] and not math.isfinite(c["threshold"])]
    if nowhere:
        advice.append(
            "for "
            + ", ".join(f"{c['label']} ({c['hit_rate']:.3f} of points at or above alpha)" for c in nowhere)
            + " more data of the same kind will not reach alpha at any similarity threshold"
        )
    tail_only = [
        c for c in d.classes if c["hit_rate"] is not None and c["hit_rate"] <= d.alpha and math.isfinite(c["threshold"])
    ]
    if nowhere or tail_only:
        advice.append(
            "only the most similar points "
            + (f"of {', '.join(c['label'] for c in tail_only)} " if tail_only else "")
            + "can be admitted: better features (another model or layer), a better-trained head or a lower alpha "
            "(SDMConfig.alphas reports several risk tiers at once) are the levers"
        )
    if selection and selection.get("settings"):
        settings = selection["settings"]
        if selection.get("epoch") == settings.get("epochs", 0) - 1:
            advice.append(
                "the kept state is the last epoch trained: the head was still improving; train longer or with a "
                "higher learning rate"
            )
        if selection.get("procedure") == "paper":
            advice.append(
                "fit_sdm_head(..., procedure='auto') (the default) trains at a higher learning rate with early "
                "stopping and chooses the normalisation on held-out training rows: on the shipped feature sets it "
                "admitted several times more at a twentieth of the cost"
            )
    return advice
