"""Markdown tables and the headline findings, rendered from summary rows only.

A cell is ``accuracy (admitted share of the test set)``; ``R`` means nothing was admitted
(there is no accuracy to show); a ``↓`` marks an accuracy more than two binomial standard
errors below alpha (``sdm_hf.evaluation.metrics.significantly_below``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sdm_experiment import ESTIMATORS, SOFTMAX_TYPE  # noqa: E402

from sdm_hf.evaluation.metrics import significantly_below  # noqa: E402
from sdm_hf.utils.counting import accuracy_or_none, format_accuracy  # noqa: E402

REJECTED = format_accuracy(None)  # "R": nothing admitted, no accuracy to show


def cell(group: dict, n_total: int, alpha: float) -> str:
    """``"0.962 (31.4%)"``, ``"0.750↓ (6.5%)"`` or ``"R"``."""
    accuracy = accuracy_or_none(group["correct"], group["admitted"])
    if accuracy is None:
        return REJECTED
    mark = "↓" if significantly_below(group["correct"], group["admitted"], alpha) else ""
    return f"{format_accuracy(accuracy)}{mark} ({group['admitted'] / max(n_total, 1):.1%})"


def worst_class(row: dict, rejected_is_worst: bool) -> str:
    """The lowest class-conditional accuracy of a row that admits something, as ``"0.917"`` or
    ``"0.750↓"``; a class with nothing admitted is ignored, or (``rejected_is_worst``) shown as ``"R"``."""
    groups = list(row["per_class"].values())
    if rejected_is_worst and any(g["admitted"] == 0 for g in groups):
        return REJECTED
    worst = min((g for g in groups if g["admitted"]), key=lambda g: g["correct"] / g["admitted"])
    return cell(worst, row["n"], row["alpha"]).split(" ")[0]


def class_ok(row: dict) -> bool:
    """Every class has admitted points and none is significantly below alpha."""
    groups = list(row["per_class"].values())
    return all(g["admitted"] > 0 for g in groups) and not any(
        significantly_below(g["correct"], g["admitted"], row["alpha"]) for g in groups
    )


def any_class_below(row: dict) -> list[str]:
    return [
        name for name, g in row["per_class"].items() if significantly_below(g["correct"], g["admitted"], row["alpha"])
    ]


def estimator_table(rows: list[dict], alpha: float) -> str:
    """One test set's rows at one alpha: every estimator, marginal, per true and predicted class."""
    mine = [r for r in rows if r["alpha"] == alpha]
    labels = list(mine[0]["per_class"])
    head = ["estimator", "marginal"] + [f"y={c}" for c in labels] + [f"ŷ={c}" for c in labels]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in mine:
        marginal = {"admitted": r["admitted"], "correct": r["correct"]}
        cells = [cell(marginal, r["n"], alpha)]
        cells += [cell(r["per_class"][c], r["n"], alpha) for c in labels]
        cells += [cell(r["per_prediction"][c], r["n"], alpha) for c in labels]
        name = ESTIMATORS.get(r["estimator"], r["estimator"])
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def hr_sweep_table(rows: list[dict], estimator: str = "sdm_hr") -> str:
    """The HR region per alpha (rows) and test set (columns): marginal and worst class."""
    tests = list(dict.fromkeys(r["test_set"] for r in rows))
    alphas = sorted({r["alpha"] for r in rows})
    lines = ["| alpha | " + " | ".join(tests) + " |", "|---|" + "---|" * len(tests)]
    for a in alphas:
        cells = []
        for t in tests:
            r = next(x for x in rows if x["alpha"] == a and x["test_set"] == t and x["estimator"] == estimator)
            if r["admitted"] == 0:
                cells.append(REJECTED)
                continue
            cells.append(f"{cell(r, r['n'], a)}; worst class {worst_class(r, rejected_is_worst=False)}")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def findings(rows: list[dict], min_share: float = 0.10) -> dict:
    """The two faces of the method, found in the rows (nothing is chosen by hand).

    * ``in_distribution``: (features, test set, alpha) where the HR region admits at least
      ``min_share`` of an in-distribution test set with every class admitted and none
      significantly below alpha;
    * ``shifted``: (features, test set, alpha, baseline, classes) where a softmax-type
      baseline is significantly below alpha on some class of a shifted set while the HR
      region is not on any class.
    """
    found_in, found_shift = [], []
    for r in rows:
        if r["estimator"] != "sdm_hr":
            continue
        if not r["shifted"] and r["admitted"] >= min_share * r["n"] and class_ok(r):
            found_in.append((r["features"], r["test_set"], r["alpha"], r["admitted"] / r["n"]))
        if r["shifted"] and not any_class_below(r):
            for b in rows:
                if (
                    b["estimator"] in SOFTMAX_TYPE
                    and (b["features"], b["test_set"], b["alpha"]) == (r["features"], r["test_set"], r["alpha"])
                    and any_class_below(b)
                ):
                    found_shift.append((r["features"], r["test_set"], r["alpha"], b["estimator"], any_class_below(b)))
    return {"in_distribution": found_in, "shifted": found_shift}


def render_findings(rows: list[dict]) -> str:
    f = findings(rows)
    lines = ["## What this run shows\n"]
    if f["in_distribution"]:
        best = {}
        for features, test, alpha, share in f["in_distribution"]:
            key = (features, test)
            if key not in best or (alpha, share) > best[key]:  # the highest alpha that works
                best[key] = (alpha, share)
        for (features, test), (alpha, share) in best.items():
            lines.append(
                f"- In distribution ({features}, {test}): the HR region admits {share:.1%} of the test set at "
                f"alpha={alpha} with every class admitted and none significantly below alpha."
            )
    else:
        lines.append(
            "- In distribution: no HR region admitted >= 10% of a test set with every class at alpha "
            "(see the tables: R = empty region)."
        )
    if f["shifted"]:
        grouped: dict = {}
        for features, test, alpha, baseline, classes in f["shifted"]:
            grouped.setdefault((features, test), {}).setdefault(baseline, []).append(f"{alpha} ({', '.join(classes)})")
        for (features, test), by_baseline in grouped.items():
            listed = "; ".join(f"{ESTIMATORS[b]} at alpha {', '.join(a)}" for b, a in by_baseline.items())
            lines.append(
                f"- Shifted ({features}, {test}): significantly below alpha on a class (in brackets) while the HR "
                f"region is not below alpha on any class: {listed}."
            )
    else:
        lines.append("- Shifted: no softmax-type baseline was significantly below alpha where the HR region was not.")
    return "\n".join(lines) + "\n"


HEADLINE = ("probe_softmax", "ce_temperature", "ce_aps", "sdm_threshold", "sdm_hr", "sdm_hr_lower")


def headline_table(rows: list[dict], alpha: float, estimators=HEADLINE) -> str:
    """One line per (feature set, test set) at one alpha: for each estimator its admitted share
    and its LOWEST class-conditional accuracy (the number the HR region promises to keep >= alpha)."""
    pairs = list(dict.fromkeys((r["task"], r["features"], r["test_set"]) for r in rows))
    head = ["task", "features", "test set", "n"] + [ESTIMATORS[e] for e in estimators]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, features, test in pairs:
        cells, n = [], 0
        for e in estimators:
            r = next(
                (
                    x
                    for x in rows
                    if (x["task"], x["features"], x["test_set"], x["estimator"]) == (task, features, test, e)
                    and x["alpha"] == alpha
                ),
                None,
            )
            if r is None:
                cells.append("-")
                continue
            n = r["n"]
            if r["admitted"] == 0:
                cells.append(REJECTED)
                continue
            cells.append(f"{worst_class(r, rejected_is_worst=True)} ({r['admitted'] / r['n']:.1%})")
        lines.append(f"| {task} | {features} | {test} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
