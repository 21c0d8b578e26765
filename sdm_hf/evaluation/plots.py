"""Figures of selective-classification results, similarity, distance and head training (optional extra ``plots``).

Each function writes one PNG with matplotlib's Agg backend (no display needed), with the optional figure ``title``,
and returns its ``Path``; each raises ImportError when matplotlib is not installed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..head.inference import SDMOutput
    from .metrics import SelectiveClassificationReport

__all__ = ["plot_accuracy_vs_admission", "plot_similarity_distance", "plot_risk_coverage", "plot_training_history"]


def _pyplot():
    """``matplotlib.pyplot`` on the Agg backend."""
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'sdm-hf[plots]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path, title: str | None, dpi: int, tight: bool = False) -> Path:
    """Title, lay out, write ``fig`` to the PNG ``path``, close it and return the path."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi, **({"bbox_inches": "tight"} if tight else {}))
    plt.close(fig)
    return path


def plot_accuracy_vs_admission(
    reports: Mapping[str, SelectiveClassificationReport],
    path: str | Path,
    alpha: float | None = None,
    title: str | None = None,
) -> Path:
    """Plot into the PNG ``path`` (returned), per test set, each estimator's admitted share (x) against its marginal
    accuracy (filled) and lowest class-conditional accuracy (hollow: what the HR region promises); an estimator
    admitting nothing is an "R" at x = 0.

    Args:
        reports: test-set name -> :class:`~sdm_hf.evaluation.metrics.SelectiveClassificationReport`.
        alpha: target accuracy, drawn as a dashed line.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(reports), figsize=(6.5 * len(reports), 5.2), squeeze=False)
    cmap = plt.get_cmap("tab20")
    lowest = min(
        [0.45]
        + [
            g["accuracy"]
            for report in reports.values()
            for row in report.rows
            for g in [row["marginal"], *row["class_conditional"]]
            if g["accuracy"] is not None
        ]
    )
    bottom = lowest - 0.05
    for ax, (name, report) in zip(axes[0], reports.items()):
        for i, row in enumerate(report.rows):
            color = cmap(i % 20)
            marginal = row["marginal"]
            if marginal["accuracy"] is None:  # all rejected: drawn on the floor of the panel
                ax.scatter([0], [bottom + 0.01], marker="x", color=color, label=f"{row['estimator']} (R)")
                continue
            worst = [g["accuracy"] for g in row["class_conditional"] if g["accuracy"] is not None]
            ax.scatter([marginal["proportion"]], [marginal["accuracy"]], color=color, s=60, label=row["estimator"])
            if worst:
                ax.scatter([marginal["proportion"]], [min(worst)], facecolors="none", edgecolors=[color], s=60)
        if alpha is not None:
            ax.axhline(alpha, ls="--", color="grey", lw=1)
            ax.text(1.0, alpha, f" alpha={alpha}", va="bottom", ha="right", color="grey", fontsize=8)
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(bottom, 1.02)
        ax.set_xlabel("admitted fraction of the test set (x at the bottom: R, nothing admitted)")
        ax.set_ylabel("accuracy (filled: marginal, hollow: worst class)")
        ax.set_title(f"{name} (n={report.num_points})")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left", bbox_to_anchor=(1.01, 0.0))
    return _save(plt, fig, path, title, dpi=120, tight=True)


def plot_similarity_distance(outputs: Mapping[str, SDMOutput], path: str | Path, title: str | None = None) -> Path:
    """Plot into the PNG ``path`` (returned) histograms of ``q + 1`` (log scale) and ``d`` per data set of ``outputs``
    (name -> :class:`~sdm_hf.SDMOutput`), e.g. in-distribution vs shifted test data."""
    plt = _pyplot()
    fig, (ax_q, ax_d) = plt.subplots(1, 2, figsize=(11, 4.2))
    max_q = max(int(o.q.max()) if len(o) else 0 for o in outputs.values())
    bins_q = torch.logspace(0, max(1.0, float(torch.log10(torch.tensor(max_q + 2.0)))), 30).tolist()
    for name, out in outputs.items():
        weights = torch.full((len(out),), 1.0 / max(len(out), 1)).tolist()
        ax_q.hist(
            (out.q + 1).tolist(),
            bins=bins_q,
            alpha=0.5,
            weights=weights,
            label=f"{name} (OOD {out.is_ood.float().mean():.0%})",
        )
        ax_d.hist(out.d.tolist(), bins=20, range=(0, 1), alpha=0.5, weights=weights, label=name)
    ax_q.set_xscale("log")
    ax_q.set_xlabel("similarity q + 1 (log scale; 1 = OOD)")
    ax_d.set_xlabel("distance quantile d (0 = farther than any calibration point)")
    for ax in (ax_q, ax_d):
        ax.set_ylabel("fraction of points")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save(plt, fig, path, title, dpi=120)


def _worst_class_accuracy(row: dict) -> float | None:
    """Lowest accuracy among the classes of ``row["per_class"]`` that admit something; None if none do."""
    accs = [g["correct"] / g["admitted"] for g in row["per_class"].values() if g["admitted"] > 0]
    return min(accs) if accs else None


def plot_risk_coverage(
    rows: list[dict], path: str | Path, estimators: dict[str, str] | None = None, title: str | None = None
) -> Path:
    """Plot into the PNG ``path`` (returned) risk-coverage curves: per (feature set, test set), each estimator's
    admitted share (x) against its lowest class-conditional accuracy (y), one point per alpha; alphas where nothing
    is admitted ("R") are counted in the legend, not drawn.

    Args:
        rows: summary rows with keys ``features``, ``test_set``, ``estimator``, ``alpha``,
            ``n``, ``admitted`` and ``per_class`` (``{label: {"n", "admitted", "correct"}}``).
        estimators: key -> display name (and which estimators to draw; default: all).
        title: figure title (default: names the alphas).

    Raises:
        ValueError: ``rows`` is empty.
    """
    plt = _pyplot()
    panels = list(dict.fromkeys((r["features"], r["test_set"]) for r in rows))
    if not panels:
        raise ValueError("rows is empty: nothing to plot")
    keys = list(estimators) if estimators else list(dict.fromkeys(r["estimator"] for r in rows))
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.6 * ncols, 4.4 * nrows), squeeze=False)
    cmap = plt.get_cmap("tab10")
    alphas = sorted({r["alpha"] for r in rows})
    for ax, (features, test_set) in zip(axes.flat, panels):
        for i, key in enumerate(keys):
            mine = sorted(
                (r for r in rows if r["features"] == features and r["test_set"] == test_set and r["estimator"] == key),
                key=lambda r: r["alpha"],
            )
            points = [(r["admitted"] / r["n"], _worst_class_accuracy(r)) for r in mine if r["n"]]
            drawn = [(x, y) for x, y in points if y is not None]
            rejected = len(points) - len(drawn)
            label = (estimators or {}).get(key, key) + (
                f" (R at {rejected} alpha{'s' * (rejected > 1)})" if rejected else ""
            )
            style = "-" if key.startswith("sdm_hr") else "--"
            if drawn:
                xs, ys = zip(*drawn)
                ax.plot(
                    xs, ys, style, marker="o", ms=3.5, color=cmap(i % 10), lw=1.6 if style == "-" else 1.0, label=label
                )
            else:
                ax.plot([], [], style, color=cmap(i % 10), label=label)
        for a in alphas:
            ax.axhline(a, color="grey", lw=0.6, ls=":")
        ax.set_xlim(-0.02, 1.02)
        ax.set_xlabel("admitted share of the test set")
        ax.set_ylabel("lowest class-conditional accuracy")
        ax.set_title(f"{features}: {test_set}", fontsize=10)
        ax.grid(alpha=0.25)
        ax.legend(fontsize=6.5, loc="lower left")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    return _save(
        plt, fig, path, title or f"Risk-coverage over alpha in {alphas} (R: nothing admitted, not drawn)", dpi=110
    )


def plot_training_history(
    histories: Mapping[str, list[dict]],
    path: str | Path,
    selections: Mapping[str, dict | None] | None = None,
    title: str | None = None,
) -> Path:
    """Plot into the PNG ``path`` (returned), per feature set, the selection rows' balanced SDM loss (the
    model-selection criterion), accuracy and OOD share per epoch and run (shuffle, or candidate and refit).

    Args:
        histories: name -> ``head.training_history`` (dicts with ``shuffle``, ``epoch``,
            ``calibration_loss``, ``calibration_accuracy``, ``calibration_ood_fraction``).
        selections: name -> ``head.selection`` (marks the kept state with a star).

    Raises:
        ValueError: ``histories`` is empty.
    """
    plt = _pyplot()
    if not histories:
        raise ValueError("histories is empty: nothing to plot")
    fig, axes = plt.subplots(2, len(histories), figsize=(5.2 * len(histories), 6.4), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for col, (name, history) in enumerate(histories.items()):
        top, bottom = axes[0][col], axes[1][col]
        chosen = (selections or {}).get(name)
        run_name = "candidate" if chosen and "chosen" in chosen else "shuffle"
        for shuffle in sorted({h["shuffle"] for h in history}):
            mine = [h for h in history if h["shuffle"] == shuffle]
            epochs = [h["epoch"] for h in mine]
            color = cmap(shuffle % 10)
            label = "refit (in-sample)" if mine[0].get("refit") else f"{run_name} {shuffle}"
            top.plot(epochs, [h["calibration_loss"] for h in mine], color=color, label=label)
            bottom.plot(epochs, [h["calibration_accuracy"] for h in mine], color=color, label=f"accuracy, {label}")
            bottom.plot(
                epochs,
                [h["calibration_ood_fraction"] for h in mine],
                color=color,
                ls=":",
                label=f"OOD share, {shuffle}",
            )
        if chosen:
            kept = [h for h in history if h["shuffle"] == chosen["shuffle"] and h["epoch"] == chosen["epoch"]]
            if kept:
                top.scatter(
                    [chosen["epoch"]], [kept[0]["calibration_loss"]], marker="*", s=140, color="black", zorder=5
                )
        top.set_title(f"{name}: balanced selection loss (* kept)", fontsize=10)
        bottom.set_xlabel("epoch (epoch 0: cross-entropy)")
        bottom.set_ylim(0, 1)
        bottom.set_title("selection-row accuracy (solid) and OOD share (dotted)", fontsize=10)
        for ax in (top, bottom):
            ax.grid(alpha=0.25)
            ax.legend(fontsize=7)
    return _save(plt, fig, path, title, dpi=110)
