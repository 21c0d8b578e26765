"""Does the HR region keep its promise on real features? A resampling check.

    python benchmarks/real_data_validity.py                 # every demo feature set, 200 draws
    python benchmarks/real_data_validity.py --draws 20 --only factcheck:attributes

The promise: under exchangeability of calibration and test data, the HR region's
class-conditional accuracy is at least alpha, up to finite-sample error. For each feature
set the SDM head is fitted once (J = 1 x E = 40 by default); then, >= 100 times, the pooled
in-distribution data (the head's calibration points + the in-distribution test set) is
shuffled and split into a calibration set of the original size and a test set, the head is
recalibrated on the former (eCDFs, q' arrays, Algorithm 1: no retraining) and evaluated on the
latter. Reported per alpha and class: the mean class-conditional HR accuracy over the draws,
the share of draws where it is more than two binomial standard errors below alpha (the
promise allows ~5% of draws by chance, a little more with the discrete quantiles), and the
mean admitted share. This is the real-data counterpart of tests/test_statistical_validity.py
(synthetic data). Results: benchmarks/results/real_data_validity.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "recipes"))
import feature_sets  # noqa: E402
from sdm_experiment import FitSettings, fit_estimators, resample_validity  # noqa: E402

JOBS = [("factcheck", "attributes"), ("factcheck", "gemma"), ("sentiment", "minilm")]
IN_DISTRIBUTION = "in-distribution"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--draws", type=int, default=200)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.8, 0.85, 0.9, 0.94, 0.95])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--shuffles", type=int, default=1)
    p.add_argument("--gemma-layer", type=int, default=feature_sets.DEFAULT_GEMMA_LAYER)
    p.add_argument("--only", nargs="+", default=None, help="task:features jobs")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=str(HERE / "results" / "real_data_validity"))
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def run(args, write=None) -> list[dict]:
    jobs = [tuple(j.split(":", 1)) for j in args.only] if args.only else JOBS
    settings = FitSettings(epochs=args.epochs, shuffles=args.shuffles, seed=args.seed, progress=not args.no_progress)
    results = []
    for task, features in jobs:
        splits = feature_sets.task_splits(task, args.seed, args.limit)
        fs = feature_sets.build_feature_set(
            task, features, splits, layer=args.gemma_layer, progress=not args.no_progress
        )
        started = time.perf_counter()
        est = fit_estimators(fs, settings, max(args.alphas))
        fit_s = time.perf_counter() - started
        started = time.perf_counter()
        res = resample_validity(
            fs, est, IN_DISTRIBUTION, args.alphas, draws=args.draws, seed=args.seed, progress=not args.no_progress
        )
        for r in res:
            r["fit_seconds"], r["resample_seconds"] = round(fit_s, 1), round(time.perf_counter() - started, 1)
        results += res
        if write is not None:  # after every feature set, so a long run keeps what it finished
            write(results)
        print(
            f"{task}:{fs.name}: fit {fit_s:.0f} s, {args.draws} draws {time.perf_counter() - started:.0f} s", flush=True
        )
    return results


def render(results: list[dict], args) -> str:
    lines = [
        "# The HR region's promise on real features (resampling, recalibration only)\n",
        f"{args.draws} draws per feature set; heads fitted once with J={args.shuffles} x E={args.epochs}. "
        "Per class: mean HR accuracy over draws that admitted that class / share of draws more than 2 binomial "
        "standard errors below alpha / mean admitted share of that class. 'any class below' = share of draws "
        "where at least one class is significantly below alpha. A class never admitted in a draw has no "
        "accuracy in it (counted under 'none').\n",
        "| task | features | estimator | alpha | n cal / test | admitted | any class below | per class |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        per = "; ".join(
            f"{name}: "
            + ("R" if g["mean_accuracy"] is None else f"{g['mean_accuracy']:.3f}")
            + f" / {g['share_significantly_below']:.1%} / {g['mean_admitted_share']:.1%}"
            + (f" (none in {g['draws_with_none_admitted']})" if g["draws_with_none_admitted"] else "")
            for name, g in r["per_class"].items()
        )
        lines.append(
            f"| {r['task']} | {r['features']} | {r['estimator']} | {r['alpha']} | {r['n_calibration']} / "
            f"{r['n_test']} | {r['mean_admitted_share']:.1%} | {r['share_draws_any_class_below']:.1%} | {per} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.draws < 1:
        raise SystemExit("error: --draws must be >= 1")
    started = time.perf_counter()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(results):
        text = render(results, args) + f"\n{time.perf_counter() - started:.0f} s on this machine (2 CPU cores).\n"
        out.with_suffix(".json").write_text(
            json.dumps({"args": vars(args), "results": results}, indent=1, allow_nan=False), encoding="utf-8"
        )
        out.with_suffix(".md").write_text(text, encoding="utf-8")
        return text

    print(write(run(args, write)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
