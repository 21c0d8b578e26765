"""The README's first example timed: ``fit_sdm_head`` with its defaults on 600 + 600 rows x 384 features.

    python benchmarks/first_example.py              # the default procedure ("auto")
    python benchmarks/first_example.py --paper      # also the papers' procedure (about 3 minutes)

The rows are all-MiniLM-L6-v2 embeddings of movie reviews (the sentiment task's training and
calibration halves, the first 600 of each; features cached by recipes/feature_sets.py), the
head is ``SDMConfig(input_dim=384, num_classes=2, alpha=0.95)``. Writes
``benchmarks/results/first_example.{json,md}``: wall time of the fit, what it chose, and the
HR region it calibrated (admitted share of the 976 held-out test reviews at alpha 0.95 and 0.90).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "recipes"))
import feature_sets  # noqa: E402

from sdm_hf import SDMConfig, fit_sdm_head  # noqa: E402

ROWS = 600


def measure(fs, procedure: str) -> dict:
    config = SDMConfig(input_dim=384, num_classes=2, alpha=0.95)
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        head = fit_sdm_head(
            fs.train_x[:ROWS], fs.train_y[:ROWS], fs.calib_x[:ROWS], fs.calib_y[:ROWS], config, procedure=procedure
        )
    seconds = time.perf_counter() - started
    test = fs.tests["in-distribution"]
    out = head.predict(test.x)
    admitted = {"0.95": float(out.in_hr.float().mean())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        head.recalibrate(alpha=0.9)
    admitted["0.9"] = float(head.predict(test.x).in_hr.float().mean())
    return {
        "procedure": procedure,
        "seconds": round(seconds, 1),
        "epochs_run": len(head.training_history),
        "selection": head.selection.summary(),
        "admitted_test_share": admitted,
        "warnings": [str(w.message)[:200] for w in caught],
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paper", action="store_true", help="also time the papers' procedure")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    fs = feature_sets.build_feature_set("sentiment", "minilm", feature_sets.task_splits("sentiment", 0), progress=False)
    results = [measure(fs, "auto")] + ([measure(fs, "paper")] if args.paper else [])
    out = HERE / "results" / "first_example"
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [
        "# The README's first example, timed\n",
        f"`fit_sdm_head(train_x, train_y, calib_x, calib_y, SDMConfig(input_dim=384, num_classes=2, alpha=0.95))` "
        f"on {ROWS} + {ROWS} MiniLM movie-review embeddings; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. Command: `python benchmarks/first_example.py"
        f"{' --paper' if args.paper else ''}`.\n",
        "| procedure | fit s | epochs run | admitted test share @0.95 | @0.90 |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        a = r["admitted_test_share"]
        lines.append(f"| {r['procedure']} | {r['seconds']} | {r['epochs_run']} | {a['0.95']:.1%} | {a['0.9']:.1%} |")
    for r in results:
        lines += ["", f"`{r['procedure']}`'s head.selection:", "", "```", r["selection"], "```"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
