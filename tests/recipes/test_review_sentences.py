"""The movie-review sentence corpus of the word-ordering recipe: parsing, filters, pair-level splits."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "recipes" / "word_ordering"))

import review_sentences as rs  # noqa: E402
import word_order_data as wod  # noqa: E402


def test_split_sentences_handles_breaks_quotes_and_c1_dashes():
    review = 'Great film.<br /><br />"It works!" she said. I liked it \x96 a lot? yes. 3 stars.'
    assert rs.split_sentences(review) == [
        "Great film.",
        '"It works!" she said.',
        "I liked it - a lot? yes.",
        "3 stars.",
    ]


def _corpus(groups):
    corpus = rs.ReviewSentences(skipped={})
    for group, sentences in groups.items():
        for sentence in sentences:
            corpus.sentences.append(sentence)
            corpus.groups.append(group)
    return corpus


def test_partition_keeps_review_pairs_together_and_drops_twins_of_shifted_sentences():
    long = " ".join(f"w{i}" for i in range(30))
    twin = long.replace("w3 ", "v3 ")  # a minimally edited copy in the same pair
    groups = {f"g{g}": [f"g{g} s{i} a b c d" for i in range(4)] for g in range(10)}
    groups["g0"] += [long, twin]
    parts, summary = rs.review_partition(_corpus(groups), {"train": 12, "calibration": 8, "test": 8}, shifted=1, seed=3)
    (held,) = parts["shifted"]
    assert held in (long, twin)  # equally long: the tie is broken by the text
    assert summary["shifted_twins_dropped"] == 1
    assert all(long not in parts[n] and twin not in parts[n] for n in ("train", "calibration", "test"))
    owner = {}
    for name in ("train", "calibration", "test"):
        assert len(parts[name]) == {"train": 12, "calibration": 8, "test": 8}[name]
        for sentence in parts[name]:
            group = sentence.split()[0]
            assert owner.setdefault(group, name) == name, f"pair {group} straddles {owner[group]} and {name}"
    with pytest.raises(ValueError, match="remain"):
        rs.review_partition(_corpus(groups), {"train": 100}, shifted=1)


def test_shipped_reviews_give_tens_of_thousands_of_sentences_and_disjoint_splits():
    corpus = rs.read_review_sentences()
    assert len(corpus.sentences) > 30_000 and len(set(corpus.sentences)) == len(corpus.sentences)
    lengths = [len(s.split()) for s in corpus.sentences]
    assert min(lengths) >= rs.MIN_WORDS and max(lengths) <= rs.MAX_WORDS
    assert not any("<" in s or ">" in s for s in corpus.sentences)
    data, summary = wod.build_splits(corpus="reviews", shifted=500, seed=0)
    assert summary["sentences"] == {"train": 3000, "calibration": 1000, "test": 1000, "shifted": 500, "harvard": 720}
    seen = {}
    for name in ("train", "calibration", "test", "shifted"):
        for sentence in data[name]["sentence"]:
            assert sentence not in seen, (sentence, name, seen.get(sentence))
            seen[sentence] = name
    others = max(len(s.split()) for n in ("train", "calibration", "test") for s in data[n]["sentence"])
    assert summary["shifted_min_words"] >= others - 1  # the longest (minus dropped twins' ties)
    assert 14 < summary["mean_words"]["train"] < 22  # the paper's Wikipedia sample: 19.1
    with pytest.raises(ValueError, match="corpus"):
        wod.build_splits(corpus="wikipedia")
