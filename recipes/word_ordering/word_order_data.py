"""Word-ordering task data (Schmaltz 2025, *Similarity-Distance-Magnitude Language Models*, arXiv:2510.26183).

The model sees a sentence's prefix and its last three words shuffled, and must reply with
the whole sentence in ``<sentence>...</sentence>`` followed by ``<verified>Yes</verified>``
(or ``No`` if it did not manage). For every sentence:

* positive: ``<sentence>gold</sentence><verified>Yes</verified>``;
* static negative: the prefix plus a *different* ordering of the three words (never the gold
  string), then ``<verified>No</verified>``; for 10% of negatives the opening, the closing or
  both sentence tags are dropped (equal probability), as in the paper.

Sentences: the SAPLMA statements (data/saplma, all topics, de-duplicated) and the Harvard
sentences (data/harvard_sentences.txt). Splits, all seeded:

* ``shifted`` (covariate-shifted test): the longest SAPLMA sentences, held out;
* ``sft`` (for the base model only), ``train``, ``calibration``, ``test`` (in-distribution
  test): a random partition of the remaining SAPLMA sentences;
* ``harvard``: the Harvard sentences (a test set only).

A sentence is skipped (and counted) when it has fewer than 4 words or fewer than 2 distinct
words among its last three (no wrong order exists); a line that is not UTF-8 is skipped and
counted. Output: TRL paired preference rows ``{prompt, chosen, rejected}`` (conversational:
one user message / one assistant message) plus ``sentence``, ``prefix``, ``shuffled``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict

sys.path.insert(0, str(Path(__file__).resolve().parent))

import review_sentences  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SAPLMA_DIR = ROOT / "data" / "saplma"
HARVARD_FILE = ROOT / "data" / "harvard_sentences.txt"
SUFFIX_WORDS = 3
TAG_NOISE = 0.10

PROMPT_TEMPLATE = (
    "Complete the sentence '{prefix}' by reordering all of the following without adding new punctuation "
    "nor words: '{shuffled}'. Only reply with the sentence in the XML <sentence> </sentence> followed by "
    "<verified>Yes</verified> if your answer correctly addressed the instructions, and <verified>No</verified> "
    "if it did not."
)
# The default is shorter than the paper's prompt (above) so that CPU runs stay fast; it keeps
# the control strings inside the prompt, which the contrastive masking must handle.
SHORT_PROMPT_TEMPLATE = (
    "Complete '{prefix}' by reordering: '{shuffled}'. Reply <sentence> </sentence> then "
    "<verified>Yes</verified> or <verified>No</verified>."
)
YES, NO = "<verified>Yes</verified>", "<verified>No</verified>"
CORPORA = ("saplma", "reviews")


@dataclass
class SkipCounts:
    """Why input lines were not used."""

    too_short: int = 0
    no_wrong_order: int = 0
    not_utf8: int = 0
    duplicate: int = 0

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("too_short", "no_wrong_order", "not_utf8", "duplicate")}


def read_lines(path, skipped: SkipCounts) -> list[str]:
    """Non-empty lines of a text file, decoded line by line; non-UTF-8 lines are counted."""
    lines = []
    for raw in Path(path).read_bytes().splitlines():
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            skipped.not_utf8 += 1
            continue
        if text:
            lines.append(text)
    return lines


def read_saplma(data_dir=SAPLMA_DIR, skipped: SkipCounts | None = None) -> list[str]:
    """The ``document`` field of every SAPLMA topic file (sorted file order)."""
    skipped = skipped if skipped is not None else SkipCounts()
    files = sorted(Path(data_dir).glob("*_true_false.csv.attributes.jsonl"))
    if not files:
        raise FileNotFoundError(f"no SAPLMA files in {data_dir}; see data/README.md")
    sentences = []
    for path in files:
        for number, line in enumerate(read_lines(path, skipped), start=1):
            try:
                sentences.append(str(json.loads(line)["document"]).strip())
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{number}: bad line ({type(err).__name__}: {err})") from None
    return sentences


def usable(sentences: list[str], skipped: SkipCounts) -> list[str]:
    """Whitespace-normalised, de-duplicated sentences that admit a wrong order of the suffix."""
    seen, kept = set(), []
    for sentence in sentences:
        words = sentence.split()
        if len(words) < SUFFIX_WORDS + 1:
            skipped.too_short += 1
            continue
        if len(set(words[-SUFFIX_WORDS:])) < 2:
            skipped.no_wrong_order += 1
            continue
        normalised = " ".join(words)
        if normalised in seen:
            skipped.duplicate += 1
            continue
        seen.add(normalised)
        kept.append(normalised)
    return kept


def _orders(suffix: list[str]) -> list[str]:
    """The distinct orderings of ``suffix`` as strings, in a fixed order (gold first)."""
    out = []
    for perm in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)):
        text = " ".join(suffix[i] for i in perm)
        if text not in out:
            out.append(text)
    return out


def make_example(sentence: str, rng: np.random.Generator, template: str = SHORT_PROMPT_TEMPLATE) -> dict:
    """One paired preference row for ``sentence`` (see the module docstring)."""
    words = sentence.split()
    prefix, suffix = " ".join(words[:-SUFFIX_WORDS]), words[-SUFFIX_WORDS:]
    orders = _orders(suffix)  # orders[0] is the gold suffix
    if len(orders) < 2:
        raise ValueError(f"no wrong order exists for {sentence!r} (fewer than 2 distinct words at the end)")
    shuffled = orders[int(rng.integers(len(orders)))]  # the prompt may show the gold order, as a random shuffle can
    wrong = orders[1 + int(rng.integers(len(orders) - 1))]
    chosen = f"<sentence>{sentence}</sentence>{YES}"
    negative = f"{prefix} {wrong}"
    opening, closing = "<sentence>", "</sentence>"
    if rng.random() < TAG_NOISE:  # drop the opening, the closing or both tags
        drop = int(rng.integers(3))
        opening = "" if drop in (0, 2) else opening
        closing = "" if drop in (1, 2) else closing
    rejected = f"{opening}{negative}{closing}{NO}"
    prompt = template.format(prefix=prefix, shuffled=shuffled)
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "sentence": sentence,
        "prefix": prefix,
        "shuffled": shuffled,
    }


def build_splits(
    sizes: dict[str, int] | None = None,
    shifted: int = 400,
    harvard: int | None = None,
    seed: int = 0,
    template: str = SHORT_PROMPT_TEMPLATE,
    saplma_dir=SAPLMA_DIR,
    harvard_file=HARVARD_FILE,
    corpus: str = "saplma",
    reviews_dir=review_sentences.sentiment_data.DATA_DIR,
) -> tuple[DatasetDict, dict]:
    """All splits as a ``DatasetDict`` and a summary (counts, skips).

    Args:
        sizes: sentences per split, in order (``sft``, ``train``, ``calibration``, ``test``;
            any value may be -1 for "all that remain"). Default for ``saplma``:
            2400 / 1200 / 1000 / -1; for ``reviews``: train 3000, calibration 1000, test 1000.
        corpus: ``saplma`` (the SAPLMA statements; the committed CPU base model's data) or
            ``reviews`` (the movie-review sentences of :mod:`review_sentences`, split by review
            pair; closer to the paper's Wikipedia sample).
        shifted: how many of the longest SAPLMA sentences form the shifted test set.
        harvard: use at most this many Harvard sentences (seeded sample; None: all).

    Raises:
        ValueError: the requested sizes exceed the usable sentences.
    """
    if corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {CORPORA}, got {corpus!r}")
    skipped = SkipCounts()
    harvard_sentences = usable(read_lines(harvard_file, skipped), skipped)
    rng = np.random.default_rng(seed)
    extra: dict = {}
    if corpus == "reviews":
        sizes = dict(sizes or {"train": 3000, "calibration": 1000, "test": 1000})
        parts, extra = review_sentences.review_partition(
            review_sentences.read_review_sentences(reviews_dir), sizes, shifted, seed=seed
        )
    else:
        sizes = dict(sizes or {"sft": 2400, "train": 1200, "calibration": 1000, "test": -1})
        pool = usable(read_saplma(saplma_dir, skipped), skipped)
        # the longest sentences are held out (ties broken by text for a fixed order)
        by_length = sorted(pool, key=lambda s: (-len(s.split()), s))
        shifted_part, rest = by_length[:shifted], by_length[shifted:]
        rest = [rest[i] for i in rng.permutation(len(rest))]
        fixed = sum(v for v in sizes.values() if v >= 0)
        if fixed > len(rest):
            raise ValueError(f"the splits ask for {fixed} sentences but only {len(rest)} remain after the shifted set")
        parts, start = {}, 0
        for name, size in sizes.items():
            size = len(rest) - fixed if size < 0 else size
            parts[name] = rest[start : start + size]
            start += size
        parts["shifted"] = shifted_part
    if harvard is not None and harvard < len(harvard_sentences):
        pick = np.sort(rng.choice(len(harvard_sentences), harvard, replace=False))
        harvard_sentences = [harvard_sentences[i] for i in pick]
    parts["harvard"] = harvard_sentences
    splits = DatasetDict(
        {
            name: Dataset.from_list(
                [make_example(s, np.random.default_rng([seed, index, i]), template) for i, s in enumerate(sentences)]
            )
            for index, (name, sentences) in enumerate(parts.items())
        }
    )
    summary = {
        "sentences": {name: len(s) for name, s in parts.items()},
        "mean_words": {name: float(np.mean([len(x.split()) for x in s])) if s else 0.0 for name, s in parts.items()},
        "skipped": skipped.as_dict(),
        "shifted_min_words": min((len(s.split()) for s in parts["shifted"]), default=0),
        "seed": seed,
        "corpus": corpus,
        **extra,
    }
    return splits, summary


def sft_rows(dataset: Dataset, copies: int, seed: int, template: str = SHORT_PROMPT_TEMPLATE) -> Dataset:
    """Plain SFT rows (TRL unpaired format, positives only) with ``copies`` fresh shuffles per
    sentence, so that the base model learns the format and the task, not one shuffle."""
    rows = []
    for i, sentence in enumerate(dataset["sentence"]):
        for c in range(copies):
            example = make_example(sentence, np.random.default_rng([seed, 99, i, c]), template)
            rows.append({"prompt": example["prompt"], "completion": example["chosen"], "label": True})
    return Dataset.from_list(rows)


def score_generations(generations: list[str], dataset) -> tuple[list[bool], list[bool]]:
    """Per generation: is its first tagged sentence the gold sentence, and is it verbatim the
    gold completion (sentence, tags and ``<verified>Yes</verified>``)?"""
    golds = [c[-1]["content"] for c in dataset["chosen"]]
    sentence = [sentence_of(g) == s for g, s in zip(generations, dataset["sentence"])]
    exact = [g.strip() == gold.strip() for g, gold in zip(generations, golds)]
    return sentence, exact


def sentence_of(completion: str) -> str | None:
    """The first ``<sentence>...</sentence>`` content of a generation (stripped), or None."""
    start = completion.find("<sentence>")
    if start < 0:
        return None
    end = completion.find("</sentence>", start)
    if end < 0:
        return None
    return completion[start + len("<sentence>") : end].strip()
