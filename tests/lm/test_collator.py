"""sdm_hf.lm.collator: padding and the SDM metadata columns."""

from sdm_hf.lm.collator import ContrastiveMaskingCollator
from sdm_hf.lm.control import ControlTokens
from sdm_hf.lm.masks import IGNORE_INDEX, encode_example
from tests.helpers import tiny_tokenizer

CONTROL = ControlTokens()


def test_collator_pads_and_carries_metadata():
    tok = tiny_tokenizer()
    rows = [
        encode_example(tok, "p", CONTROL.add("a b c d", True), True),
        encode_example(tok, "p", CONTROL.add("x", False), False),
    ]
    rows[0]["document_id"], rows[1]["document_id"] = 7, 7
    batch = ContrastiveMaskingCollator(pad_token_id=tok.pad_token_id)(rows)
    n0, n1 = len(rows[0]["input_ids"]), len(rows[1]["input_ids"])
    assert batch["input_ids"].shape == (2, max(n0, n1))
    assert batch["attention_mask"].sum(1).tolist() == [n0, n1]
    assert batch["reward"].tolist() == [1, 0] and batch["document_id"].tolist() == [7, 7]
    assert (batch["labels"][1, n1:] == IGNORE_INDEX).all()


def test_collator_pads_to_a_multiple_and_rejects_mismatched_rows():
    import pytest

    collate = ContrastiveMaskingCollator(pad_token_id=0, pad_to_multiple_of=4)
    batch = collate([{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, 8, 9]}, {"input_ids": [3], "labels": [3]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0], [3, 0, 0, 0, 0, 0, 0, 0]]
    assert batch["attention_mask"].sum(1).tolist() == [5, 1] and batch["labels"][1, 1:].eq(IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="row 1: input_ids and labels must have the same length"):
        collate([{"input_ids": [1], "labels": [1]}, {"input_ids": [1, 2], "labels": [2]}])
    with pytest.raises(ValueError, match="empty batch"):
        collate([])
