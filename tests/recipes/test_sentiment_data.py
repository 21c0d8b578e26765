import re
import sys
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "recipes"))

import sentiment_data as sd  # noqa: E402

HEADER = "Sentiment\tText\tbatch_id\n"


@pytest.fixture(scope="module")
def reviews():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shipped files have no incomplete or same-label pairs
        return sd.load_reviews()


@pytest.fixture(scope="module")
def tweet_files(tmp_path_factory):
    def write(texts, labels):
        folder = tmp_path_factory.mktemp("tweets")
        (folder / "text.txt").write_text("".join(t + "\n" for t in texts), encoding="utf-8", newline="")
        (folder / "labels.txt").write_text("".join(f"{v}\n" for v in labels), encoding="utf-8", newline="")
        return folder / "text.txt", folder / "labels.txt"

    return write


def write_tsv(tmp_path, body, header=HEADER, name="toy_paired.tsv"):
    path = tmp_path / name
    path.write_text(header + body, encoding="utf-8", newline="")
    return path


def test_shipped_reviews_counts_and_balance(reviews):
    assert {name: len(d) for name, d in reviews.items()} == {"train": 3414, "dev": 490, "test": 976}
    for name, data in reviews.items():
        assert data.column_names == ["id", "label", "document", "pair_id", "split"]
        assert Counter(data["label"][:]) == {0: len(data) // 2, 1: len(data) // 2}
        assert set(data["split"][:]) == {name}
        assert len(set(data["id"][:])) == len(data)
        assert data[0]["id"] == f"{name}-2"  # line 1 is the header


def test_shipped_pairs(reviews):
    expected = {"train": (1707, 1), "dev": (245, 0), "test": (488, 1)}
    for name, data in reviews.items():
        stats = sd.pair_stats(data)
        pairs, identical = expected[name]
        assert stats == {
            "rows": 2 * pairs,
            "pairs": pairs,
            "not_two_rows": 0,
            "same_label": 0,
            "identical_text": identical,
        }
        members = defaultdict(list)
        for pair_id, label in zip(data["pair_id"][:], data["label"][:]):
            members[pair_id].append(label)
        assert all(sorted(labels) == [0, 1] for labels in members.values())
        # the two rows of a pair are adjacent
        assert data["pair_id"][0::2] == data["pair_id"][1::2]
    # batch ids are disjoint across the splits, so train + dev can be pooled and re-split by pair_id
    ids = [set(d["pair_id"][:]) for d in reviews.values()]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    # the documented quirks: two "revisions" identical to their original, one review in both train and dev
    for name, pair_id in (("train", 8822), ("test", 8893)):
        texts = [t for t, p in zip(reviews[name]["document"][:], reviews[name]["pair_id"][:]) if p == pair_id]
        assert len(texts) == 2 and texts[0] == texts[1]
    where = defaultdict(set)
    for name, data in reviews.items():
        for text, pair_id in zip(data["document"][:], data["pair_id"][:]):
            where[text].add((name, pair_id))
    assert [sorted(v) for v in where.values() if len({n for n, _ in v}) > 1] == [[("dev", 14006), ("train", 3011)]]


def test_quoted_fields_and_line_numbers(tmp_path):
    body = (
        'Negative\t"a\ttab, a\nnewline and ""quotes"""\t7\n'
        "Positive\tplain text\t7\n"
        "\n"
        'Negative\t"two\nmore\nlines"\t9\n'
        "Positive\tend\t9\n"
    )
    data = sd.read_reviews(write_tsv(tmp_path, body))
    assert data["document"][:] == ['a\ttab, a\nnewline and "quotes"', "plain text", "two\nmore\nlines", "end"]
    assert data["id"][:] == ["toy-2", "toy-4", "toy-6", "toy-9"]
    assert data["label"][:] == [0, 1, 0, 1]
    assert data["pair_id"][:] == [7, 7, 9, 9]


@pytest.mark.parametrize(
    "body, line, message",
    [
        ('Negative\t"multi\nline"\t1\nPositive\tok\t1\nNeutral\tmeh\t2\n', 5, "unknown sentiment"),
        ("Negative\tok\t1\nPositive\tmissing batch id\n", 3, "expected 3"),
        ("Negative\tok\t1\nPositive\t  \t1\n", 3, "empty text"),
        ("Negative\tok\tx1\n", 2, "batch_id"),
        ('Negative\tok\t1\nPositive\t"never closed\t1\nNegative\tok\t2\n', 3, "quoting"),
        ('Negative\t"closed" then more\t1\n', 2, "quoting"),
    ],
)
def test_bad_row_names_file_and_line(tmp_path, body, line, message):
    path = write_tsv(tmp_path, body)
    with pytest.raises(ValueError, match=message) as info:
        sd.read_reviews(path)
    assert f"{path}:{line}:" in str(info.value)


@pytest.mark.parametrize("header", ["Text\tSentiment\tbatch_id\n", "Sentiment,Text,batch_id\n", ""])
def test_bad_header(tmp_path, header):
    path = write_tsv(tmp_path, "Negative\tok\t1\n" if header else "", header=header)
    with pytest.raises(ValueError, match="header") as info:
        sd.read_reviews(path)
    assert str(path) in str(info.value)


def test_incomplete_pair_warns_but_reads(tmp_path):
    path = write_tsv(tmp_path, "Negative\ta\t1\nPositive\tb\t1\nNegative\tc\t2\nNegative\td\t3\nNegative\te\t3\n")
    with pytest.warns(UserWarning, match="1 batch_id"):
        data = sd.read_reviews(path)
    assert len(data) == 5
    assert sd.pair_stats(data)["same_label"] == 1


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        sd.read_reviews(tmp_path / "nope_paired.tsv")


def test_shipped_tweets_binary_balanced():
    tweets = sd.read_tweets()
    assert tweets.column_names == ["id", "label", "document"]
    assert len(tweets) == 4750
    assert Counter(tweets["label"][:]) == {0: 2375, 1: 2375}
    lines = [int(i.removeprefix("tweet-")) for i in tweets["id"][:]]
    assert lines == sorted(lines)
    again = sd.read_tweets(seed=0)
    assert again["id"][:] == tweets["id"][:]
    assert sd.read_tweets(seed=1)["id"][:] != tweets["id"][:]
    full = sd.read_tweets(binary=False, balanced=False)
    assert len(full) == 12284
    assert Counter(full["label"][:]) == {0: 3972, 1: 5937, 2: 2375}
    # every positive tweet is kept (it is the smaller class); labels follow the binary mapping
    positives = {i for i, v in zip(full["id"][:], full["label"][:]) if v == 2}
    assert {i for i, v in zip(tweets["id"][:], tweets["label"][:]) if v == 1} == positives


def test_tweets_mapping_and_whitespace(tweet_files):
    texts = ["neg  one ", "neu\ttwo", " pos three", "neg four", "pos\rfive", "neg six"]
    text_path, labels_path = tweet_files(texts, [0, 1, 2, 0, 2, 0])
    unbalanced = sd.read_tweets(text_path, labels_path, balanced=False)
    assert unbalanced["document"][:] == ["neg  one ", " pos three", "neg four", "pos\rfive", "neg six"]
    assert unbalanced["label"][:] == [0, 1, 0, 1, 0]
    assert unbalanced["id"][:] == ["tweet-1", "tweet-3", "tweet-4", "tweet-5", "tweet-6"]
    balanced = sd.read_tweets(text_path, labels_path, seed=3)
    assert Counter(balanced["label"][:]) == {0: 2, 1: 2}
    assert {"tweet-3", "tweet-5"} <= set(balanced["id"][:])
    three = sd.read_tweets(text_path, labels_path, binary=False)
    assert Counter(three["label"][:]) == {0: 1, 1: 1, 2: 1}


def test_tweets_length_mismatch(tweet_files):
    text_path, labels_path = tweet_files(["a", "b", "c"], [0, 2])
    with pytest.raises(ValueError) as info:
        sd.read_tweets(text_path, labels_path)
    assert str(text_path) in str(info.value) and str(labels_path) in str(info.value)


def test_tweets_bad_label_line(tweet_files):
    text_path, labels_path = tweet_files(["a", "b", "c"], [0, "positive", 2])
    with pytest.raises(ValueError, match=re.escape(f"{labels_path}:2:")):
        sd.read_tweets(text_path, labels_path)


def test_shuffle_tokens(reviews):
    texts = reviews["test"]["document"][:200] + ["", "one", "  two   words "]
    shuffled = sd.shuffle_tokens(texts, seed=5)
    assert len(shuffled) == len(texts)
    for before, after in zip(texts, shuffled):
        assert Counter(before.split()) == Counter(after.split())
    assert shuffled[-3:] == ["", "one", shuffled[-1]] and shuffled[-1] in ("two words", "words two")
    assert sd.shuffle_tokens(texts, seed=5) == shuffled
    assert sd.shuffle_tokens(texts, seed=6) != shuffled
    assert sum(a.split() != b.split() for a, b in zip(texts[:200], shuffled[:200])) == 200
    assert sd.shuffle_tokens([]) == []
    far = sd.shuffled_reviews(reviews["test"].select(range(4)), seed=5)
    assert far["document"][:] == shuffled[:4] and far["label"][:] == reviews["test"]["label"][:4]


def test_group_split_keeps_pairs_together(reviews):
    pool = sd.pooled_reviews()
    assert len(pool) == 3414 + 490
    parts = sd.group_split(pool, (0.6, 0.2, 0.2), seed=0)
    assert sum(len(p) for p in parts) == len(pool)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(pool)))
    pair_ids = np.asarray(pool["pair_id"][:])
    sides = [set(pair_ids[p].tolist()) for p in parts]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    assert [len(p) for p in parts] == [2 * round(0.6 * 1952), 2 * (round(0.8 * 1952) - round(0.6 * 1952)), 780]
    assert all(np.all(np.diff(p) > 0) for p in parts)
    again = sd.group_split(pool["pair_id"][:], (0.6, 0.2, 0.2), seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not np.array_equal(sd.group_split(pool, (0.6, 0.2, 0.2), seed=1)[0], parts[0])
    with pytest.raises(ValueError, match="fractions"):
        sd.group_split(pool, (0.5, 0.6))
