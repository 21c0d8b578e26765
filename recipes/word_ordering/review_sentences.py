"""Natural sentences for the word-ordering task: the shipped movie reviews split into sentences.

The SDM language-model paper (Schmaltz 2025, arXiv:2510.26183, Sec. 4) samples 5-60-word
English Wikipedia sentences (mean 19.1 words), tests in distribution on held-out ones and on
the 720 Harvard sentences, and under covariate shift on sentences of length 60. Wikipedia is
not shipped here; the counterfactually-augmented IMDb reviews are (data/sentiment/cad, 4,880
reviews in 2,440 original/revision pairs). Split into sentences they give ~33,500 distinct
sentences of 5-60 words (mean 18.4), which play the role of the Wikipedia sample:

* ``<br />`` tags become spaces, the two cp1252 dashes stored as C1 controls become ``-``;
  sentences end at ``.``, ``!`` or ``?`` (optionally followed by closing quotes or brackets)
  before whitespace and an upper-case letter, digit or opening quote;
* kept: 5 to 60 words, no ``<`` or ``>`` (they would collide with the task's XML tags), at
  least 2 distinct words among the last three (else no wrong order exists); exact duplicates
  are dropped (a review and its revision share most sentences);
* ``shifted`` (covariate shift): the longest sentences; the near-twins of a shifted sentence
  in its review pair (its counterpart in the revised review: same pair, word-set Jaccard
  overlap >= 0.5) are dropped from the other splits, so that no minimally edited copy of a
  shifted sentence is trained on;
* ``train`` / ``calibration`` / ``test``: whole review pairs are assigned to one split
  (seeded), so that a sentence and its minimally edited revision never straddle training,
  calibration and test.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sentiment_data  # noqa: E402  (the shipped reviews' reader)

MIN_WORDS, MAX_WORDS = 5, 60
TWIN_JACCARD = 0.5
_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


@dataclass
class ReviewSentences:
    """Distinct sentences and the review pair each came from (its first occurrence)."""

    sentences: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)


def split_sentences(review: str) -> list[str]:
    """The sentences of one review, whitespace-normalised (see the module docstring)."""
    text = _BREAK.sub(" ", review).replace("\x96", "-").replace("\x97", "-")
    return [" ".join(part.split()) for part in _SENTENCE_END.split(text) if part.strip()]


def read_review_sentences(data_dir=sentiment_data.DATA_DIR, splits=sentiment_data.REVIEW_SPLITS) -> ReviewSentences:
    """Every usable distinct sentence of the shipped reviews with its review-pair id.

    Raises:
        FileNotFoundError / ValueError: from the review reader (missing file; bad row, with its file:line).
    """
    out = ReviewSentences(skipped={"length": 0, "angle_brackets": 0, "no_wrong_order": 0, "duplicate": 0})
    seen: set[str] = set()
    for name, reviews in sentiment_data.load_reviews(splits, data_dir).items():
        for review, pair in zip(sentiment_data.column(reviews, "document"), sentiment_data.column(reviews, "pair_id")):
            for sentence in split_sentences(review):
                words = sentence.split()
                if not MIN_WORDS <= len(words) <= MAX_WORDS:
                    out.skipped["length"] += 1
                elif "<" in sentence or ">" in sentence:
                    out.skipped["angle_brackets"] += 1
                elif len(set(words[-3:])) < 2:
                    out.skipped["no_wrong_order"] += 1
                elif sentence in seen:
                    out.skipped["duplicate"] += 1
                else:
                    seen.add(sentence)
                    out.sentences.append(sentence)
                    out.groups.append(f"{name}-{pair}")
    return out


def _jaccard(a: str, b: str) -> float:
    x, y = set(a.split()), set(b.split())
    return len(x & y) / len(x | y)


def review_partition(
    corpus: ReviewSentences, sizes: dict[str, int], shifted: int, seed: int = 0
) -> tuple[dict[str, list[str]], dict]:
    """Sentences per split: ``shifted`` (the longest), then ``sizes`` (name -> sentences, in
    order; -1 = all that remain) filled with whole review pairs in a seeded order.

    Returns:
        ``(parts, summary)``: split name -> sentences; summary counts (twins dropped, pairs,
        sentences left unused).

    Raises:
        ValueError: the sizes ask for more sentences than remain.
    """
    order = sorted(range(len(corpus.sentences)), key=lambda i: (-len(corpus.sentences[i].split()), corpus.sentences[i]))
    held = set(order[:shifted])
    by_group: dict[str, list[int]] = {}
    for i, group in enumerate(corpus.groups):
        by_group.setdefault(group, []).append(i)
    twins = set()
    for i in held:  # a shifted sentence's minimally edited counterpart is not trained on
        for j in by_group[corpus.groups[i]]:
            if j not in held and _jaccard(corpus.sentences[i], corpus.sentences[j]) >= TWIN_JACCARD:
                twins.add(j)
    names = sorted(by_group)
    rng = np.random.default_rng(seed)
    excluded = held | twins
    pool = [j for k in rng.permutation(len(names)) for j in by_group[names[k]] if j not in excluded]
    fixed = sum(v for v in sizes.values() if v >= 0)
    if fixed > len(pool):
        raise ValueError(f"the splits ask for {fixed} sentences but only {len(pool)} remain after the shifted set")
    parts: dict[str, list[str]] = {}
    start = 0
    for name, size in sizes.items():
        size = len(pool) - fixed if size < 0 else size
        chosen = pool[start : start + size]
        start += size
        if chosen and start < len(pool):  # the pair cut at the boundary: its rest is not used elsewhere
            last = corpus.groups[chosen[-1]]
            while start < len(pool) and corpus.groups[pool[start]] == last:
                start += 1
        parts[name] = [corpus.sentences[j] for j in chosen]
    parts["shifted"] = [corpus.sentences[i] for i in order[:shifted]]
    summary = {
        "corpus": "movie-review sentences (data/sentiment/cad)",
        "distinct_sentences": len(corpus.sentences),
        "review_pairs": len(names),
        "shifted_twins_dropped": len(twins),
        "unused_sentences": len(pool) - sum(len(v) for v in parts.values()),
        "review_skipped": dict(corpus.skipped),
    }
    return parts, summary
