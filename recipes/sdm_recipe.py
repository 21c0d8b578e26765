"""Run (task, feature set) jobs end to end and write their results to one folder.

Used by ``factcheck.py``, ``sentiment.py`` and ``demo.py`` (``make demo``). For each job:
features (cached), the SDM head and every baseline, evaluation at every alpha of the grid,
explained predictions; then, for all jobs together: ``summary.json`` (one row per feature
set, test set, estimator and alpha), ``results.md`` (rendered from those rows),
``risk_coverage.png``, ``similarity_distance_<features>.png``, ``training_history.png`` and
each fitted head under ``heads/<task>-<features>/`` (``SDMHead.from_pretrained`` loads it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import feature_sets  # noqa: E402
import sdm_report  # noqa: E402
from sdm_experiment import ESTIMATORS, FitSettings, evaluate, explain, fit_estimators  # noqa: E402

from sdm_hf.evaluation.plots import plot_risk_coverage, plot_similarity_distance, plot_training_history  # noqa: E402
from sdm_hf.utils.output_dir import check_output_dir, replacing_output_dir  # noqa: E402

DEFAULT_ALPHAS = (0.8, 0.85, 0.9, 0.94, 0.95, 0.97)
TABLE_ALPHAS = (0.9, 0.95)


def add_common_arguments(p: argparse.ArgumentParser, output: str) -> None:
    p.add_argument(
        "--procedure",
        choices=("auto", "fast", "paper"),
        default="auto",
        help="fit_sdm_head's named procedure (default auto: settings chosen on held-out training rows)",
    )
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the procedure's)")
    p.add_argument("--shuffles", type=int, default=None, help="shuffles J of paper/fast (default: the procedure's)")
    p.add_argument("--paper", action="store_true", help="the papers' settings: 10 shuffles x 200 epochs at lr 1e-5")
    p.add_argument("--learning-rate", type=float, default=None, help="Adam learning rate (default: the procedure's)")
    p.add_argument("--alpha", type=float, default=0.95, help="the alpha the heads are fitted and explained at")
    p.add_argument("--alphas", type=float, nargs="+", default=list(DEFAULT_ALPHAS), help="alpha grid of the tables")
    p.add_argument("--gemma-layer", type=int, default=feature_sets.DEFAULT_GEMMA_LAYER, help="Gemma layer to pool")
    p.add_argument(
        "--max-length", type=int, default=feature_sets.DEFAULT_MAX_LENGTH, help="truncate texts to this many tokens"
    )
    p.add_argument("--limit", type=int, default=None, help="at most this many rows per file (smoke runs)")
    p.add_argument("--tweets-per-class", type=int, default=None, help="sample the shifted tweets (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=output)
    p.add_argument("--overwrite", action="store_true", help="replace an output folder this program wrote")
    p.add_argument("--examples", type=int, default=2, help="explained predictions per test set")
    p.add_argument("--no-progress", action="store_true")


def settings_of(args) -> FitSettings:
    if args.paper:
        args.procedure = "paper"
    for a in [args.alpha, *args.alphas]:
        if not 0.5 < a <= 1:
            raise SystemExit(f"error: every alpha must be in (0.5, 1], got {a}")
    return FitSettings(
        procedure=args.procedure,
        epochs=args.epochs,
        shuffles=args.shuffles,
        learning_rate=args.learning_rate,
        seed=args.seed,
        progress=not args.no_progress,
    )


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def run_jobs(jobs: list[tuple[str, str]], args, title: str) -> int:
    """Run every (task, features) job and write the folder; returns a process exit code."""
    started = time.perf_counter()
    settings = settings_of(args)
    out_dir = Path(args.output)
    try:
        check_output_dir(out_dir, args.overwrite)  # refuse before any long work
    except FileExistsError as err:
        raise SystemExit(f"error: {err}") from None
    progress = not args.no_progress
    rows, explanations, histories, selections, timings, notes = [], [], {}, {}, [], []
    outputs_by_set, heads, chosen = {}, {}, {}
    splits_cache = {}
    for task, features in jobs:
        if task not in splits_cache:
            splits_cache[task] = feature_sets.task_splits(task, args.seed, args.limit, args.tweets_per_class)
        splits = splits_cache[task]
        print(f"\n== {task}: {features} ==", flush=True)
        for name, data in splits.items():
            print(f"  {name:30s} {len(data):6d} rows")
        fs = feature_sets.build_feature_set(
            task, features, splits, layer=args.gemma_layer, max_length=args.max_length, progress=progress
        )
        print(f"  features: {fs.train_x.shape[1]} dims ({fs.seconds:.0f} s)", flush=True)
        est = fit_estimators(fs, settings, args.alpha)
        job_rows, outputs = evaluate(fs, est, args.alphas)
        rows += job_rows
        key = f"{task}: {fs.name}"
        explanations += explain(fs, est, outputs, per_set=args.examples)
        histories[key] = est.head.training_history
        selections[key] = est.head.selection
        outputs_by_set[key] = outputs
        heads[key] = est.head
        notes += [f"{key}: {n}" for n in est.notes]
        timings.append({"job": key, "feature_seconds": round(fs.seconds, 1), "fit_seconds": round(est.fit_seconds, 1)})
        print(f"  fit {est.fit_seconds:.0f} s; {est.head.selection.summary()}", flush=True)
        chosen[key] = _chosen_text(est.head.selection)

    with replacing_output_dir(out_dir, args.overwrite, program=Path(sys.argv[0]).name or "sdm_recipe") as folder:
        summary = {
            "rows": rows,
            "settings": {
                "procedure": settings.procedure,
                "chosen": chosen,
                "epochs": settings.epochs,
                "shuffles": settings.shuffles,
                "learning_rate": settings.learning_rate,
                "seed": settings.seed,
                "alpha": args.alpha,
                "alphas": sorted(set(args.alphas) | {args.alpha}),
                "gemma_layer": args.gemma_layer,
                "max_length": args.max_length,
                "limit": args.limit,
                "tweets_per_class": args.tweets_per_class,
            },
            "timings": timings,
        }
        (folder / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False), encoding="utf-8")
        text = render_markdown(rows, title, settings, timings, notes, explanations, chosen)
        (folder / "results.md").write_text(text, encoding="utf-8")
        plot_risk_coverage(rows, folder / "risk_coverage.png", estimators=ESTIMATORS)
        plot_training_history(histories, folder / "training_history.png", selections=selections)
        for key, outputs in outputs_by_set.items():
            plot_similarity_distance(
                outputs,
                folder / f"similarity_distance_{_slug(key)}.png",
                title=f"{key}: similarity q and distance d, in-distribution vs shifted (alpha={args.alpha})",
            )
        for key, head in heads.items():
            head.save_pretrained(folder / "heads" / _slug(key))
    print("\n" + text)
    print(f"wrote {out_dir}/ (summary.json, results.md, plots, heads/) in {time.perf_counter() - started:.0f} s")
    return 0


def _chosen_text(selection) -> str:
    """One line: the procedure, the setting it chose (auto) and the kept epoch."""
    text = f"procedure {selection['procedure']}"
    if "chosen" in selection:
        text += ", chose " + ", ".join(f"{k}={v}" for k, v in sorted(selection["chosen"].items()))
    return text + f", kept epoch {selection['epoch']}"


def render_markdown(rows, title, settings, timings, notes, explanations, chosen=None) -> str:
    lines = [f"# {title}\n"]
    asked = ", ".join(
        f"{k}={v}"
        for k, v in (("epochs", settings.epochs), ("shuffles", settings.shuffles), ("lr", settings.learning_rate))
        if v is not None
    )
    lines.append(
        f"SDM heads: fit_sdm_head(procedure={settings.procedure!r}{', ' + asked if asked else ''}), seed "
        f"{settings.seed}. "
        "Cells: accuracy (admitted share of the test set); R = nothing admitted; ↓ = more than two binomial "
        "standard errors below alpha. y=c: class-conditional (true label c), ŷ=c: prediction-conditional.\n"
    )
    if chosen:
        lines.append("Settings each head chose (fit_sdm_head's head.selection):\n")
        lines += [f"* {key}: {text}" for key, text in chosen.items()]
        lines.append("")
    lines.append(sdm_report.render_findings(rows))
    for alpha in TABLE_ALPHAS:
        if any(r["alpha"] == alpha for r in rows):
            lines.append(
                f"\n### At alpha = {alpha}: lowest class-conditional accuracy (admitted share); R = nothing admitted; "
                "↓ = significantly below alpha. A class with no admitted point counts as R.\n"
            )
            lines.append(sdm_report.headline_table(rows, alpha))
    for task, features in dict.fromkeys((r["task"], r["features"]) for r in rows):
        mine = [r for r in rows if r["task"] == task and r["features"] == features]
        lines.append(f"\n## {task}: {features}\n")
        lines.append("HR region by alpha (recalibrated, not retrained):\n")
        lines.append(sdm_report.hr_sweep_table(mine))
        for test in dict.fromkeys(r["test_set"] for r in mine):
            for alpha in TABLE_ALPHAS:
                sub = [r for r in mine if r["test_set"] == test and r["alpha"] == alpha]
                if not sub:
                    continue
                lines.append(f"\n### {test}: {sub[0]['n']} points, alpha = {alpha}\n")
                lines.append(sdm_report.estimator_table(sub, alpha))
    lines.append("\n## A few predictions, explained by the nearest training exemplar\n")
    lines += explanations
    if notes:
        lines.append("\n## Notes from the fits\n")
        lines += [f"- {n}" for n in notes]
    lines.append("\n## Time\n")
    lines += [f"- {t['job']}: features {t['feature_seconds']} s, fits {t['fit_seconds']} s" for t in timings]
    return "\n".join(lines) + "\n"
