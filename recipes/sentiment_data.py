"""Load the shipped sentiment data (data/sentiment) as `datasets.Dataset`s.

Three test conditions for a binary (negative / positive) sentiment classifier, see data/README.md for the
sources and licences:

* in-distribution: the counterfactually-augmented IMDb movie reviews of Kaushik, Hovy & Lipton (ICLR 2020),
  `cad/{train,dev,test}_paired.tsv`. The recipes pool train + dev for the SDM head's training and
  calibration (re-split with `group_split`) and keep the test split as the in-distribution test set.
* shifted: the SemEval-2017 Task 4A English test tweets (via TweetEval), `read_tweets` with the neutral
  class dropped and the two remaining classes balanced (2,375 + 2,375 from the shipped files).
* far-OOD: the test reviews with each review's words randomly permuted (`shuffle_tokens`, "word salad").
  Mean pooling over token states is nearly order-invariant (only the contextualisation of each token changes),
  so mean-pooled features barely move under shuffling; a last-token or CLS representation does see the order.

Pairs: every review has a counterfactual revision (minimal edits that flip the label) with the same
`batch_id` (`pair_id` here). In the shipped files each batch_id occurs exactly twice with opposite labels, the
two rows adjacent. Keep both members of a pair on the same side of any split (`group_split`), or a near
duplicate with the flipped label leaks across training / calibration / test. Known quirks of the shipped
files: in two pairs (train batch_id 8822, test 8893) the "revision" is character-for-character the original
with the opposite label (`pair_stats` counts these as identical_text); one positive review occurs in both train
(batch_id 3011) and dev (14006) under different batch ids, so it can land on both sides of a split of the
pooled train + dev; texts contain `<br />` tags and some cp1252 dashes decoded as C1
controls (U+0096, U+0097); some end with a space. The reader leaves texts exactly as stored.

Rows are parsed one by one so that a bad row is reported with its file and the line where the record starts.
"""

from __future__ import annotations

import csv
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
from datasets import Dataset, concatenate_datasets

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "sentiment"
REVIEWS_DIR = DATA_DIR / "cad"
TWEETS_DIR = DATA_DIR / "tweets"
REVIEW_SPLITS = ("train", "dev", "test")
REVIEW_FILE = "{split}_paired.tsv"  # under <data_dir>/cad
REVIEW_HEADER = ("Sentiment", "Text", "batch_id")
SENTIMENT_TO_LABEL = {"Negative": 0, "Positive": 1}
TWEET_TEXT = TWEETS_DIR / "test_text.txt"
TWEET_LABELS = TWEETS_DIR / "test_labels.txt"
TWEET_MAPPING = TWEETS_DIR / "mapping.txt"
TWEET_ID2LABEL = {0: "negative", 1: "neutral", 2: "positive"}  # SemEval-2017 Task 4A
ID2LABEL = {0: "negative", 1: "positive"}


def column(dataset, name) -> list:
    # datasets >= 4 returns a lazy Column whose iteration is row by row; a full slice is one Arrow conversion.
    return dataset[name][:]


def _split_name(path: Path) -> str:
    return path.stem.removesuffix("_paired")


def read_reviews(path, split=None) -> Dataset:
    """One `*_paired.tsv` file -> Dataset with columns id, label, document, pair_id, split.

    `id` is f"{split}-{line}" (the line where the record starts), `label` 0 negative / 1 positive, `pair_id`
    the integer batch_id, `split` defaults to the file name without "_paired". Warns (does not fail) when
    a batch_id does not occur exactly twice with opposite labels.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: wrong header, or a bad row (wrong number of fields, unknown sentiment, empty text,
            non-integer batch_id, broken quoting); the message names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing data file {path}; see data/README.md")
    split = _split_name(path) if split is None else str(split)
    columns = {"id": [], "label": [], "document": [], "pair_id": [], "split": []}
    # newline="" lets the csv module see newlines inside quoted fields; strict=True rejects broken quoting
    # (an unterminated quote would otherwise swallow the rest of the file into one field).
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", strict=True)
        try:
            header = next(reader, None)
        except csv.Error as err:
            raise ValueError(f"{path}:1: bad header ({err})") from None
        if header is None or tuple(header) != REVIEW_HEADER:
            raise ValueError(f"{path}: header must be {'<TAB>'.join(REVIEW_HEADER)!r}, got {header!r}")
        while True:
            start = reader.line_num + 1  # line_num is the last line consumed: the previous record's end
            try:
                row = next(reader, None)
            except csv.Error as err:
                raise ValueError(f"{path}:{start}: bad quoting ({err})") from None
            if row is None:
                break
            if not row:  # blank line
                continue
            if len(row) != len(REVIEW_HEADER):
                raise ValueError(f"{path}:{start}: expected {len(REVIEW_HEADER)} tab-separated fields, got {len(row)}")
            sentiment, text, batch_id = row
            if sentiment not in SENTIMENT_TO_LABEL:
                raise ValueError(
                    f"{path}:{start}: unknown sentiment {sentiment!r} (expected one of Negative, Positive)"
                )
            if not text.strip():
                raise ValueError(f"{path}:{start}: empty text")
            try:
                pair_id = int(batch_id)
            except ValueError:
                raise ValueError(f"{path}:{start}: batch_id must be an integer, got {batch_id!r}") from None
            columns["id"].append(f"{split}-{start}")
            columns["label"].append(SENTIMENT_TO_LABEL[sentiment])
            columns["document"].append(text)
            columns["pair_id"].append(pair_id)
            columns["split"].append(split)
    stats = pair_stats(columns)
    if stats["not_two_rows"] or stats["same_label"]:
        warnings.warn(
            f"{path}: {stats['not_two_rows']} batch_id(s) do not occur exactly twice and {stats['same_label']} "
            "pair(s) do not have opposite labels",
            stacklevel=2,
        )
    return Dataset.from_dict(columns)


def pair_stats(dataset) -> dict[str, int]:
    """Counts over the pairs of a reviews Dataset (or a dict of its columns).

    Keys: rows, pairs (distinct pair_ids), not_two_rows (pair_ids with a row count other than 2), same_label
    (two-row pairs whose labels are not opposite), identical_text (two-row pairs whose texts are equal).
    """
    pair_ids = column(dataset, "pair_id")
    members = defaultdict(list)
    for pair_id, label, text in zip(pair_ids, column(dataset, "label"), column(dataset, "document")):
        members[pair_id].append((label, text))
    twos = [rows for rows in members.values() if len(rows) == 2]
    return {
        "rows": len(pair_ids),
        "pairs": len(members),
        "not_two_rows": len(members) - len(twos),
        "same_label": sum(a[0] == b[0] for a, b in twos),
        "identical_text": sum(a[1] == b[1] for a, b in twos),
    }


def load_reviews(splits=REVIEW_SPLITS, data_dir=DATA_DIR) -> dict[str, Dataset]:
    """`{split: read_reviews(<data_dir>/cad/<split>_paired.tsv)}` for the given splits."""
    if isinstance(splits, str):
        splits = (splits,)
    return {split: read_reviews(Path(data_dir) / "cad" / REVIEW_FILE.format(split=split)) for split in splits}


def pooled_reviews(splits=("train", "dev"), data_dir=DATA_DIR) -> Dataset:
    """The given review splits as one Dataset (the recipes' training + calibration pool)."""
    return concatenate_datasets(list(load_reviews(splits, data_dir).values()))


def _read_lines(path: Path) -> list[str]:
    # newline="\n": only "\n" ends a line (a stray "\r" or U+2028 inside a tweet stays in the tweet).
    with path.open(encoding="utf-8", newline="\n") as handle:
        return [line.removesuffix("\n") for line in handle]


def read_tweets(text_path=TWEET_TEXT, labels_path=TWEET_LABELS, binary=True, balanced=True, seed=0) -> Dataset:
    """SemEval-2017 tweets -> Dataset with columns id, label, document.

    `id` is f"tweet-{line}" (1-based line in the files). Labels in the files: 0 negative, 1 neutral,
    2 positive. `binary` drops neutral and maps positive -> 1, negative -> 0 (`ID2LABEL`); otherwise the
    three labels are kept. `balanced` subsamples every larger class (numpy Generator seeded with `seed`)
    to the size of the smallest; the kept rows stay in file order. Only the trailing newline of a tweet is
    removed (the shipped tweets all end with a space, which is kept).

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: the two files differ in line count (both named), or a label line is not 0/1/2 (path:line).
    """
    text_path, labels_path = Path(text_path), Path(labels_path)
    for path in (text_path, labels_path):
        if not path.is_file():
            raise FileNotFoundError(f"missing data file {path}; see data/README.md")
    texts, label_lines = _read_lines(text_path), _read_lines(labels_path)
    if len(texts) != len(label_lines):
        raise ValueError(f"{text_path} has {len(texts)} lines but {labels_path} has {len(label_lines)}")
    labels = np.empty(len(label_lines), dtype=np.int64)
    for number, line in enumerate(label_lines, start=1):
        value = line.strip()
        if value not in ("0", "1", "2"):
            raise ValueError(f"{labels_path}:{number}: label must be 0, 1 or 2, got {line!r}")
        labels[number - 1] = int(value)
    keep = np.arange(len(labels))
    if binary:
        keep = keep[labels != 1]
        labels = np.where(labels == 2, 1, 0)
    if balanced and len(keep):
        rng = np.random.default_rng(seed)
        classes, counts = np.unique(labels[keep], return_counts=True)
        smallest = counts.min()
        parts = []
        for cls in classes:
            members = keep[labels[keep] == cls]
            parts.append(members if len(members) == smallest else rng.choice(members, smallest, replace=False))
        keep = np.sort(np.concatenate(parts))
    return Dataset.from_dict(
        {
            "id": [f"tweet-{i + 1}" for i in keep],
            "label": labels[keep].tolist(),
            "document": [texts[i] for i in keep],
        }
    )


def load_tweets(data_dir=DATA_DIR, binary=True, balanced=True, seed=0) -> Dataset:
    """`read_tweets` on <data_dir>/tweets/test_{text,labels}.txt."""
    tweets = Path(data_dir) / "tweets"
    return read_tweets(tweets / "test_text.txt", tweets / "test_labels.txt", binary, balanced, seed)


def shuffle_tokens(texts, seed=0) -> list[str]:
    """Each text's whitespace tokens in a random order, re-joined with single spaces.

    One seeded Generator draws a random key per token of all texts and a single lexsort orders the tokens by
    (text, key): the permutations of different texts are independent, and the same texts and seed give the
    same result. The multiset of each text's tokens is unchanged; a text with fewer than two tokens is only
    whitespace-normalised.
    """
    token_lists = [str(text).split() for text in texts]
    lengths = np.fromiter((len(tokens) for tokens in token_lists), dtype=np.int64, count=len(token_lists))
    if lengths.sum() == 0:
        return [" ".join(tokens) for tokens in token_lists]
    tokens = np.empty(int(lengths.sum()), dtype=object)
    tokens[:] = [token for text_tokens in token_lists for token in text_tokens]
    owner = np.repeat(np.arange(len(token_lists)), lengths)
    keys = np.random.default_rng(seed).random(len(tokens))
    shuffled = tokens[np.lexsort((keys, owner))]
    ends = np.cumsum(lengths)
    return [" ".join(shuffled[end - n : end]) for n, end in zip(lengths, ends)]


def shuffled_reviews(dataset, seed=0) -> Dataset:
    """A copy of a reviews Dataset with `shuffle_tokens` applied to `document` (the far-OOD set)."""
    documents = shuffle_tokens(column(dataset, "document"), seed=seed)
    return dataset.remove_columns("document").add_column("document", documents)


def group_split(dataset, fractions, seed=0) -> tuple[np.ndarray, ...]:
    """Row indices of a random split that keeps every group on one side.

    `dataset` is a Dataset with a `pair_id` column or a sequence of group ids. The distinct groups are put in
    a random order (numpy Generator seeded with `seed`) and cut at the cumulative `fractions` (positive,
    summing to 1) of the number of groups; each returned array holds the rows of its groups, ascending.
    """
    groups = np.asarray(column(dataset, "pair_id") if hasattr(dataset, "column_names") else list(dataset))
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.ndim != 1 or len(fractions) == 0 or (fractions <= 0).any() or abs(fractions.sum() - 1) > 1e-6:
        raise ValueError(f"fractions must be positive and sum to 1, got {fractions.tolist()}")
    unique, inverse = np.unique(groups, return_inverse=True)
    order = np.random.default_rng(seed).permutation(len(unique))
    cuts = np.round(np.cumsum(fractions)[:-1] * len(unique)).astype(np.int64)
    part_of_group = np.empty(len(unique), dtype=np.int64)
    for part, chosen in enumerate(np.split(order, cuts)):
        part_of_group[chosen] = part
    part_of_row = part_of_group[inverse.reshape(-1)]
    return tuple(np.flatnonzero(part_of_row == part) for part in range(len(fractions)))
