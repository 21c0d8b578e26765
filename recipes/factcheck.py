"""Fact checking: an SDM head over frozen features of true/false statements, against every baseline.

    python recipes/factcheck.py --overwrite                                # attributes + Gemma 3 270M
    python recipes/factcheck.py --features attributes gemma minilm --overwrite   # all three side by side
    python recipes/factcheck.py --paper --overwrite                        # the papers' J=10 x E=200 (slow on CPU)

Data (data/saplma, Azaria & Mitchell 2023): train = cities + elements + facts, calibration =
inventions + companies + animals (re-split 50/50 in every shuffle), an in-distribution test set
held out from those six files (10%, seeded, per file), and the LLM-generated statements as a
distribution-shifted test set. Features: the shipped Mixtral-derived `attributes`, Gemma 3 270M
hidden states (one layer, concat(mean, final token)), or all-MiniLM-L6-v2 sentence embeddings.
Writes summary.json, results.md, plots and the fitted heads to --output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import feature_sets  # noqa: E402
import sdm_recipe  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", nargs="+", choices=feature_sets.FEATURES, default=["attributes", "gemma"])
    sdm_recipe.add_common_arguments(p, output="outputs/factcheck")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    jobs = [("factcheck", f) for f in dict.fromkeys(args.features)]
    return sdm_recipe.run_jobs(jobs, args, title="Fact checking: SDM head vs baselines")


if __name__ == "__main__":
    raise SystemExit(main())
