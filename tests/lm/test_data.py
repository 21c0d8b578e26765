"""sdm_hf.lm.data.encode_documents: every static version tokenized once through datasets.map."""

import pytest

from sdm_hf.lm import prepare_documents
from sdm_hf.lm.control import ControlTokens
from sdm_hf.lm.data import encode_documents
from sdm_hf.lm.masks import encode_example
from tests.helpers import tiny_tokenizer

CONTROL = ControlTokens()
ROWS = [
    {"prompt": "Order: the a cat sat", "chosen": "the cat sat a", "rejected": "a sat cat the"},
    {"prompt": [{"role": "user", "content": "Order: dog big"}], "chosen": "big dog", "rejected": "dog big"},
    {"prompt": "Order: one", "chosen": "one", "rejected": "one one"},
]


@pytest.mark.parametrize("num_proc", [None, 2])
def test_encode_documents_equals_encode_example_per_version(num_proc):
    tok = tiny_tokenizer()
    documents, _ = prepare_documents(ROWS, CONTROL)
    encoded = encode_documents(tok, documents, CONTROL, num_proc=num_proc)
    assert len(encoded) == 6
    for doc in documents:
        for text, positive in [(doc.positive, True), (doc.negatives[0], False)]:
            row = encoded[(doc.id, text)]
            expected = encode_example(tok, doc.prompt, text, positive, CONTROL)
            assert {k: row[k] for k in expected} == expected
            assert row["document_id"] == doc.id and row["text"] == text


def test_encode_documents_names_the_document_that_cannot_be_encoded():
    tok = tiny_tokenizer()
    documents, _ = prepare_documents(ROWS, CONTROL)
    with pytest.raises(ValueError, match="document 0: max_length=3 cuts the document"):
        encode_documents(tok, documents, CONTROL, max_length=3)
    assert encode_documents(tok, [], CONTROL) == {}


def test_trl_implicit_prompt_rows_are_split_by_trl():
    """Only chosen/rejected, the prompt inside both (TRL's implicit-prompt format): TRL's
    maybe_extract_prompt splits the shared turns off, as TRL's trainers do."""
    pytest.importorskip("trl")
    user = {"role": "user", "content": "Order: dog big"}
    rows = [
        {
            "chosen": [user, {"role": "assistant", "content": "big dog"}],
            "rejected": [user, {"role": "assistant", "content": "dog big"}],
        }
    ]
    documents, _ = prepare_documents(rows, CONTROL)
    assert documents[0].prompt == [user]
    assert documents[0].positive == CONTROL.add("big dog", True)
    assert documents[0].negatives == [CONTROL.add("dog big", False)]
    explicit, _ = prepare_documents(ROWS, CONTROL)  # rows with a prompt are left as they are
    assert explicit[0].prompt == ROWS[0]["prompt"] and explicit[1].prompt == ROWS[1]["prompt"]
