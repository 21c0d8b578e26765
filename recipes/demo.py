"""`make demo`: both faces of an SDM estimator on real models and real distribution shift.

    python recipes/demo.py --overwrite            # what `make demo` runs (a few minutes on 2 CPU cores)
    python recipes/demo.py --full --overwrite     # + MiniLM on fact checking and Gemma on sentiment (slow)

Jobs: fact checking over the Mixtral-derived attributes and over Gemma 3 270M hidden states
(held-out in-distribution statements; LLM-generated statements as the shifted set), and
sentiment over all-MiniLM-L6-v2 embeddings (movie reviews in distribution; SemEval-2017 tweets
shifted; word-shuffled reviews far out of distribution). Every job compares the SDM head's HR
region with softmax, temperature scaling, APS, RAPS and the head's own softmax rules, at a grid
of alphas, and ends with predictions explained by their nearest training exemplar.
Writes outputs/demo/: summary.json (one row per feature set, test set, estimator and alpha),
results.md, risk_coverage.png, similarity_distance_*.png, training_history.png, heads/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sdm_recipe  # noqa: E402

DEMO_JOBS = [("factcheck", "attributes"), ("factcheck", "gemma"), ("sentiment", "minilm")]
FULL_JOBS = DEMO_JOBS + [("factcheck", "minilm"), ("sentiment", "gemma")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="also MiniLM on fact checking and Gemma on sentiment")
    p.add_argument("--only", nargs="+", default=None, help="run only these task:features jobs, e.g. factcheck:gemma")
    sdm_recipe.add_common_arguments(p, output="outputs/demo")
    # heads with fit_sdm_head's default procedure ("auto"); sizes that keep `make demo` within 10
    # minutes on 2 CPU cores including set-up; --tweets-per-class 0 for all 2 x 2,375 tweets,
    # --paper for the papers' 10 x 200 epochs (slow)
    p.set_defaults(tweets_per_class=1000)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    jobs = FULL_JOBS if args.full else DEMO_JOBS
    if args.only:
        wanted = [tuple(j.split(":", 1)) for j in args.only]
        unknown = [":".join(j) for j in wanted if j not in FULL_JOBS]
        if unknown:
            raise SystemExit(f"error: unknown job(s) {unknown}; choose from {[':'.join(j) for j in FULL_JOBS]}")
        jobs = wanted
    return sdm_recipe.run_jobs(jobs, args, title="SDM estimators on real models: in distribution and under shift")


if __name__ == "__main__":
    raise SystemExit(main())
