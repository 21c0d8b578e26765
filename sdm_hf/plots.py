"""Figures people would rather look at than read (matplotlib, optional extra ``plots``).

Every function writes one PNG and returns its path; matplotlib is imported lazily with the
non-interactive Agg backend, so nothing here needs a display.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["plot_accuracy_vs_admission", "plot_similarity_distance"]


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'sdm-hf[plots]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_admission(reports: dict, path, alpha: float | None = None, title: str | None = None) -> Path:
    """One panel per test set: each estimator's admission rate (x) against its marginal
    accuracy (filled marker) and its lowest class-conditional accuracy (hollow marker, the
    number the HR region promises). Estimators that admit nothing sit at x = 0 marked "R".

    Args:
        reports: test-set name -> :class:`~sdm_hf.metrics.SelectiveClassificationReport`.
        path: output PNG.
        alpha: draws the target accuracy as a dashed line.
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
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_similarity_distance(outputs: dict, path, title: str | None = None) -> Path:
    """Histograms of ``q`` (log scale, ``q + 1``) and ``d`` per data set, e.g. in-distribution
    vs shifted test data.

    Args:
        outputs: data-set name -> :class:`~sdm_hf.SDMOutput`.
        path: output PNG.
    """
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
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
