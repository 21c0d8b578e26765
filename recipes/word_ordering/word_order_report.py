"""Tables, figures and the seed study of the word-ordering experiment (``word_order_experiment.py``).

Per seed: ``tables.md`` (the HR region of every test-time head at every alpha, with Wilson 95%
intervals; accuracy of the generations; the heads' calibration) and ``admitted_vs_alpha.png``.
Over seeds: ``comparison.md`` / ``comparison.json`` (per run the seed mean of the admitted share,
the pooled HR and class-conditional accuracy with intervals, and the paired differences of SDM
fine-tuning against standard fine-tuning with a t interval over seeds) and
``admitted_vs_alpha.png`` (seed means as lines, the range over seeds as bands).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from sdm_hf.evaluation.metrics import wilson_interval

#: the comparisons the SDM language-model paper makes (Schmaltz 2025, Table 2): each SDM
#: fine-tuning run against standard fine-tuning with contrastive masking
PAIRS = (("SDM+FT(CM+HN)", "FT(CM)"), ("SDM+FT(CM)", "FT(CM)"), ("SDM+FT(CM+HN)", "FT(CM+HN)"))
HEAD_NAMES = {
    "mixed": "calibrated on the papers' mix (positives, static negatives, wrong generations)",
    "generations": "calibrated on the model's own greedy generations of held-out calibration prompts",
}
# two-sided 95% quantiles of Student's t for 1..10 degrees of freedom; above 10 the value for 10
# (2.228) is used, which is conservative (the quantile falls towards 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def fmt(value, digits: int = 3) -> str:
    """A number, or "R" (nothing admitted) for None."""
    return "R" if value is None else f"{value:.{digits}f}"


def rate(successes: int, n: int) -> str:
    """``k/n = 0.xxx [low, high]`` with the Wilson 95% interval; "R (0 admitted)" for n = 0."""
    if n == 0:
        return "R (0)"
    low, high = wilson_interval(successes, n)
    return f"{successes}/{n} = {successes / n:.3f} [{low:.2f}, {high:.2f}]"


def verdict(successes: int, n: int, alpha: float) -> str:
    """Whether an accuracy keeps alpha: "yes", "below (interval reaches alpha)", "below" or "R"."""
    if n == 0:
        return "R"
    if successes / n >= alpha:
        return "yes"
    return "below (interval reaches alpha)" if wilson_interval(successes, n)[1] >= alpha else "below"


def class_check(counts: dict, alpha: float) -> str:
    """Every class's admitted accuracy against alpha: "yes", or the classes below, or "R"."""
    groups = {name: g for name, g in counts["per_class"].items() if g["admitted"]}
    if not groups:
        return "R"
    verdicts = {name: verdict(g["correct"], g["admitted"], alpha) for name, g in groups.items()}
    below = [f"{name} {v}" for name, v in verdicts.items() if v != "yes"]
    return "; ".join(below) or "yes"


def _alphas(results: dict) -> list[str]:
    first = next(iter(results.values()))
    kind = next(iter(first["test"]["test"]["tiers"]))
    return list(first["test"]["test"]["tiers"][kind])


def seed_tables(results: dict, header: list[str], test_names: dict, footer: list[str]) -> str:
    """Markdown of one seed's runs (``results``: run -> its metrics.json)."""
    lines = list(header)
    first = next(iter(results.values()))
    kinds = list(first["final_heads"])
    alphas = _alphas(results)
    for kind in kinds:
        lines += [
            "",
            f"## HR region of the test-time head {HEAD_NAMES[kind]} (paper Table 2, with risk tiers)",
            "",
            "Admitted: generations in the head's HR region at that alpha out of the test set (n/|D|); HR "
            "accuracy: the head's verdict (Yes: the generation is correct) among them; y=No / y=Yes: accuracy "
            "among admitted generations whose true label is No (wrong) / Yes (right), the class-conditional "
            "promise. Wilson 95% intervals in brackets; R: nothing admitted.",
            "",
            "| test set | run | alpha | admitted | HR accuracy | y=No | y=Yes | HR acc. >= alpha | every class |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, label in test_names.items():
            for run, m in results.items():
                for key in alphas:
                    c = m["test"][name]["tiers"][kind][key]
                    alpha = float(key)
                    per = c["per_class"]
                    lines.append(
                        f"| {label} | {run} | {key} | {rate(c['admitted'], c['n'])} | "
                        f"{rate(c['correct'], c['admitted'])} | {rate(per['No']['correct'], per['No']['admitted'])} | "
                        f"{rate(per['Yes']['correct'], per['Yes']['admitted'])} | "
                        f"{verdict(c['correct'], c['admitted'], alpha)} | {class_check(c, alpha)} |"
                    )
    lines += [
        "",
        "## Generations, no selection (paper Table 3)",
        "",
        "| test set | run | sentence accuracy | exact match | "
        + " | ".join(f"head ({k}) accuracy, no rejection" for k in kinds)
        + " | LM's own Yes/No accuracy |",
        "|---|---|---|---|" + "---|" * len(kinds) + "---|",
    ]
    for name, label in test_names.items():
        for run, m in results.items():
            t = m["test"][name]
            own = t["report"]["estimators"][2]["marginal"]["accuracy"]
            lines.append(
                f"| {label} | {run} | {t['sentence_accuracy']:.3f} | {t['exact_match_accuracy']:.3f} | "
                + " | ".join(fmt(t["head_accuracy_no_rejection"][k]) for k in kinds)
                + f" | {fmt(own)} |"
            )
    lines += [
        "",
        "## Test-time heads on their calibration rows (paper Table 5)",
        "",
        "| run | head | procedure | q'_min | calibration rows (Yes) | "
        + " | ".join(f"admitted at {a}" for a in alphas)
        + " | generated negatives | head time | train time |",
        "|---|---|---|---|---|" + "---|" * len(alphas) + "---|---|---|",
    ]
    for run, m in results.items():
        for kind, h in m["final_heads"].items():
            if "unavailable" in h:  # counted as admitting nothing above
                lines.append(f"| {run} | {kind} | no head: {h['unavailable']} |" + " |" * (len(alphas) + 6))
                continue
            q = "inf" if h["q_min"] is None else f"{h['q_min']:.2f}"
            lines.append(
                f"| {run} | {kind} | {h['procedure']} | {q} | {h['calibration_points']} ({h['calibration_yes']}) | "
                + " | ".join(str(h["calibration_hr_admitted_at"][a]) for a in alphas)
                + f" | {h['generated_negatives']} | {h['seconds']:.0f} s | {m['train_runtime_seconds']:.0f} s |"
            )
    return "\n".join(lines + [""] + footer)


def t_interval(values: list[float]) -> tuple[float, float, float] | None:
    """``(mean, low, high)``: the mean of ``values`` with a two-sided 95% Student t interval over
    them (independent replicates, e.g. seeds); None for fewer than 2 values."""
    if len(values) < 2:
        return None
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = _T975[min(n - 1, len(_T975)) - 1] * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def _pooled(counts: list[dict]) -> dict:
    """Counts summed over seeds (marginal and per true class)."""
    out = {"n": 0, "admitted": 0, "correct": 0, "per_class": {}}
    for c in counts:
        for key in ("n", "admitted", "correct"):
            out[key] += c[key]
        for name, g in c["per_class"].items():
            slot = out["per_class"].setdefault(name, {"n": 0, "admitted": 0, "correct": 0})
            for key in slot:
                slot[key] += g[key]
    return out


def study_summary(per_seed: dict[int, dict]) -> dict:
    """Aggregate ``per_seed`` (seed -> run -> metrics.json) into plain numbers (comparison.json)."""
    seeds = sorted(per_seed)
    results = per_seed[seeds[0]]
    runs = [r for r in results if all(r in per_seed[s] for s in seeds)]
    kinds = list(results[runs[0]]["final_heads"])
    alphas = _alphas(results)
    rows, pairs = [], []
    for kind in kinds:
        for name in results[runs[0]]["test"]:
            for key in alphas:
                counts = {run: [per_seed[s][run]["test"][name]["tiers"][kind][key] for s in seeds] for run in runs}
                for run in runs:
                    shares = [c["admitted"] / c["n"] for c in counts[run]]
                    pooled = _pooled(counts[run])
                    rows.append(
                        {
                            "head": kind,
                            "test_set": name,
                            "alpha": float(key),
                            "run": run,
                            "share_per_seed": shares,
                            "share_mean": sum(shares) / len(shares),
                            "pooled": pooled,
                            "seeds_keeping_alpha": sum(
                                c["admitted"] > 0 and c["correct"] / c["admitted"] >= float(key) for c in counts[run]
                            ),
                            "seeds_admitting": sum(c["admitted"] > 0 for c in counts[run]),
                            "exact_match_mean": sum(
                                per_seed[s][run]["test"][name]["exact_match_accuracy"] for s in seeds
                            )
                            / len(seeds),
                        }
                    )
                for a, b in PAIRS:
                    if a not in runs or b not in runs:
                        continue
                    diffs = [(ca["admitted"] - cb["admitted"]) / ca["n"] for ca, cb in zip(counts[a], counts[b])]
                    interval = t_interval(diffs)
                    pairs.append(
                        {
                            "head": kind,
                            "test_set": name,
                            "alpha": float(key),
                            "sdm": a,
                            "baseline": b,
                            "difference_per_seed": diffs,
                            "difference_mean": sum(diffs) / len(diffs),
                            "t_interval_95": None if interval is None else [interval[1], interval[2]],
                            "sdm_pooled": _pooled(counts[a]),
                            "baseline_pooled": _pooled(counts[b]),
                        }
                    )
    alphas_f = [float(a) for a in alphas]
    return {"seeds": seeds, "runs": runs, "heads": kinds, "alphas": alphas_f, "rows": rows, "pairs": pairs}


def _interval_text(pair: dict) -> str:
    iv = pair["t_interval_95"]
    per = ", ".join(f"{100 * d:+.1f}" for d in pair["difference_per_seed"])
    if iv is None:
        return f"{100 * pair['difference_mean']:+.1f} pp (one seed: no interval)"
    return f"{100 * pair['difference_mean']:+.1f} pp [{100 * iv[0]:+.1f}, {100 * iv[1]:+.1f}] (seeds: {per})"


def study_tables(summary: dict, test_names: dict, header: list[str], footer: list[str]) -> str:
    """Markdown of the seed study (``summary`` from :func:`study_summary`)."""
    seeds = summary["seeds"]
    lines = list(header) + [
        "",
        f"Seeds: {', '.join(map(str, seeds))} (fine-tuning seed: data order, version draws, head splits; the data "
        "partition and the test sets are the same for every seed, so the comparison is paired).",
        "",
        "## Paired comparison: admitted share of SDM fine-tuning minus standard fine-tuning",
        "",
        "Difference in the share of test generations admitted to the HR region (percentage points), the mean "
        "over seeds with a 95% t interval over seeds (3 seeds: wide); HR accuracy pooled over seeds with its "
        "Wilson 95% interval, for both runs.",
        "",
    ]
    for kind in summary["heads"]:
        lines += [
            f"### Test-time head {HEAD_NAMES[kind]}",
            "",
            "| test set | alpha | comparison | admitted share difference | HR acc. SDM run | HR acc. baseline | "
            "SDM run >= alpha | baseline >= alpha |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for p in summary["pairs"]:
            if p["head"] != kind:
                continue
            sa, sb = p["sdm_pooled"], p["baseline_pooled"]
            lines.append(
                f"| {test_names[p['test_set']]} | {p['alpha']} | {p['sdm']} vs {p['baseline']} | {_interval_text(p)} | "
                f"{rate(sa['correct'], sa['admitted'])} | {rate(sb['correct'], sb['admitted'])} | "
                f"{verdict(sa['correct'], sa['admitted'], p['alpha'])} | "
                f"{verdict(sb['correct'], sb['admitted'], p['alpha'])} |"
            )
        lines.append("")
    lines += [
        "## Every run, pooled over seeds",
        "",
        "Admitted share: mean over seeds [min, max]; accuracies: pooled over seeds (admitted generations of all "
        "seeds together) with Wilson 95% intervals; kept: seeds whose HR accuracy is >= alpha / seeds that "
        "admitted anything; exact match: the generations' accuracy with no selection (mean over seeds).",
        "",
    ]
    for kind in summary["heads"]:
        lines += [
            f"### Test-time head {HEAD_NAMES[kind]}",
            "",
            "| test set | alpha | run | admitted share | HR accuracy | y=No | y=Yes | every class | kept | "
            "exact match |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in summary["rows"]:
            if r["head"] != kind:
                continue
            c, per = r["pooled"], r["pooled"]["per_class"]
            lines.append(
                f"| {test_names[r['test_set']]} | {r['alpha']} | {r['run']} | {r['share_mean']:.3f} "
                f"[{min(r['share_per_seed']):.3f}, {max(r['share_per_seed']):.3f}] | "
                f"{rate(c['correct'], c['admitted'])} | "
                f"{rate(per['No']['correct'], per['No']['admitted'])} | "
                f"{rate(per['Yes']['correct'], per['Yes']['admitted'])} | {class_check(c, r['alpha'])} | "
                f"{r['seeds_keeping_alpha']}/{r['seeds_admitting']} | {r['exact_match_mean']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines + footer)


def plot_admitted_vs_alpha(summary: dict, path: Path, test_names: dict, title: str) -> None:
    """Admitted share vs alpha, one panel per (head, test set); a line per run at the seed mean,
    a band over the seeds' range (no band for one seed)."""
    try:
        from sdm_hf.evaluation.plots import _pyplot
    except ImportError:  # pragma: no cover - plots are optional
        return
    plt = _pyplot()
    kinds, sets = summary["heads"], list(test_names)
    fig, axes = plt.subplots(len(kinds), len(sets), figsize=(4.2 * len(sets), 3.4 * len(kinds)), squeeze=False)
    for i, kind in enumerate(kinds):
        for j, name in enumerate(sets):
            ax = axes[i][j]
            for run in summary["runs"]:
                rows = sorted(
                    (r for r in summary["rows"] if (r["head"], r["test_set"], r["run"]) == (kind, name, run)),
                    key=lambda r: r["alpha"],
                )
                xs = [r["alpha"] for r in rows]
                line = ax.plot(xs, [r["share_mean"] for r in rows], marker="o", ms=3, label=run)[0]
                if len(summary["seeds"]) > 1:
                    low = [min(r["share_per_seed"]) for r in rows]
                    high = [max(r["share_per_seed"]) for r in rows]
                    ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.15)
            ax.set_ylim(bottom=0.0, top=max(0.01, ax.get_ylim()[1]))  # an empty panel still starts at 0
            ax.set_title(f"{test_names[name]}\nhead: {kind}", fontsize=9)
            ax.set_xlabel("alpha")
            ax.set_ylabel("admitted share of test generations")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_study(root: Path, per_seed: dict[int, dict], test_names: dict, header: list[str], footer: list[str]) -> str:
    """comparison.json, comparison.md and admitted_vs_alpha.png in ``root``; returns the markdown."""
    summary = study_summary(per_seed)
    (root / "comparison.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    text = study_tables(summary, test_names, header, footer)
    (root / "comparison.md").write_text(text, encoding="utf-8")
    seeds = ", ".join(map(str, summary["seeds"]))
    plot_admitted_vs_alpha(summary, root / "admitted_vs_alpha.png", test_names, f"HR region vs alpha (seeds {seeds})")
    return text
