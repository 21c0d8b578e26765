"""Sentiment: an SDM head over frozen features of movie reviews, tested on reviews, tweets and word salad.

    python recipes/sentiment.py --overwrite                          # MiniLM features
    python recipes/sentiment.py --features minilm gemma --overwrite  # + Gemma 3 270M (slow on CPU: see README)

Data (data/sentiment): the counterfactually-augmented IMDb reviews of Kaushik et al. (2020):
train + dev pooled and split 50/50 by counterfactual pair into the head's training and
calibration halves (kept in every shuffle, so no review and its label-flipped revision straddle
the split); the test reviews are the in-distribution test set. Shifted: the SemEval-2017 Task 4A
tweets, binary (neutral dropped) and class-balanced, as in the SDM activations paper. Far-OOD:
the test reviews with their words shuffled. What each pooling sees: mean pooling is nearly
invariant to word order (each token's state still changes with its context), so mean-pooled
MiniLM features move little under shuffling; Gemma's final-token state does see the order.
Writes summary.json, results.md, plots and the fitted heads to --output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sdm_recipe  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", nargs="+", choices=("minilm", "gemma"), default=["minilm"])
    sdm_recipe.add_common_arguments(p, output="outputs/sentiment")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    jobs = [("sentiment", f) for f in dict.fromkeys(args.features)]
    return sdm_recipe.run_jobs(jobs, args, title="Sentiment: SDM head vs baselines under distribution shift")


if __name__ == "__main__":
    raise SystemExit(main())
