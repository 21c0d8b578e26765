import warnings

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast, pipeline

import sdm_hf  # noqa: F401  (registers the tasks)
from sdm_hf import SDMConfig, SDMHead
from sdm_hf.features import extract_features
from sdm_hf.hub import save_sdm_model
from sdm_hf.lm.encoding import ControlTokens, verification_features
from tests.lm.fixtures import tiny_causal_lm, tiny_tokenizer

WORDS = [f"w{i}" for i in range(30)]


def _head_on(features, labels, **config):
    head = SDMHead(
        SDMConfig(input_dim=features.shape[1], exemplar_dim=8, alpha=0.9, **config),
        generator=torch.Generator().manual_seed(0),
    )
    half = features.shape[0] // 2
    head.set_normalization(*SDMHead.normalization_statistics(features))
    head.build_support(features[:half], labels[:half], texts=[f"doc {i}" for i in range(half)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        head.calibrate(features[half:], labels[half:])
    return head


@pytest.fixture(scope="module")
def encoder_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS))
    tokenizer = BertTokenizerFast(vocab_file=str(root / "vocab.txt"), model_max_length=10)
    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            vocab_size=35,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            max_position_embeddings=16,
        )
    ).eval()
    g = torch.Generator().manual_seed(1)
    texts = [" ".join(WORDS[j] for j in torch.randint(0, 30, (4,), generator=g).tolist()) for _ in range(80)]
    feats = extract_features(model, tokenizer, texts, pooling="mean", progress=False)
    labels = torch.arange(80) % 2
    head = _head_on(feats, labels, feature_pooling="mean", id2label={0: "neg", 1: "pos"})
    save_sdm_model(model, head, root / "repo", tokenizer=tokenizer)
    return root / "repo", head, texts


def test_text_classification_single_and_batched(encoder_repo):
    path, head, texts = encoder_repo
    clf = pipeline("sdm-text-classification", model=str(path), device="cpu")
    one = clf(texts[0])
    assert set(one) == {
        "label",
        "score",
        "high_reliability",
        "high_reliability_lower",
        "is_ood",
        "q",
        "d",
        "rescaled_similarity",
        "truncated",
        "nearest_exemplar",
    }
    assert one["label"] in ("neg", "pos") and set(one["nearest_exemplar"]) == {"index", "id", "label", "text"}
    many = clf(texts[:5], batch_size=2)
    assert len(many) == 5 and many[0] == one
    # the same numbers as the head on the same features
    expected = head.predict(extract_features(clf.model, clf.tokenizer, texts[:5], progress=False))
    assert [r["q"] for r in many] == expected.q.tolist()
    long = clf(" ".join(WORDS))
    assert long["truncated"] is True


def test_text_classification_errors(encoder_repo, tmp_path):
    path, head, texts = encoder_repo
    clf = pipeline("sdm-text-classification", model=str(path), device="cpu")
    with pytest.raises(ValueError, match="unknown option"):
        clf(texts[0], temperature=2)
    with pytest.raises(ValueError, match="no inputs"):
        clf([])
    bare = tmp_path / "bare"
    clf.model.save_pretrained(bare)
    clf.tokenizer.save_pretrained(bare)
    with pytest.raises(ValueError, match="sdm_head="):
        pipeline("sdm-text-classification", model=str(bare), device="cpu")
    explicit = pipeline("sdm-text-classification", model=str(bare), sdm_head=str(path / "sdm_head"), device="cpu")
    assert explicit(texts[0])["q"] == clf(texts[0])["q"]
    wrong = SDMHead(SDMConfig(input_dim=8, exemplar_dim=4, feature_pooling="mean_last"))
    with pytest.raises(ValueError, match="16"):
        pipeline("sdm-text-classification", model=str(bare), sdm_head=wrong, device="cpu")(texts[0])


@pytest.fixture(scope="module")
def lm_repo(tmp_path_factory):
    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm(tokenizer)
    sentences = [line for line in open("data/harvard_sentences.txt").read().splitlines() if line.strip()][:60]
    prompts = [f"Repeat: {s}" for s in sentences]
    control = ControlTokens()
    completions = [control.add(s if i % 2 else s[::-1], bool(i % 2)) for i, s in enumerate(sentences)]
    labels = torch.tensor([i % 2 for i in range(60)])
    feats = verification_features(model, tokenizer, prompts, completions)
    head = _head_on(feats, labels, feature_pooling="verification", id2label={0: "No", 1: "Yes"})
    root = tmp_path_factory.mktemp("lm") / "repo"
    save_sdm_model(model, head, root, tokenizer=tokenizer)
    return root, prompts, completions


def test_verify_generate_and_verify_only(lm_repo):
    path, prompts, completions = lm_repo
    verify = pipeline("sdm-verify", model=str(path), device="cpu", max_new_tokens=5)
    generated = verify(prompts[0])
    assert set(generated) == {
        "generated_text",
        "verified",
        "probability",
        "high_reliability",
        "high_reliability_lower",
        "q",
        "d",
        "rescaled_similarity",
        "is_ood",
        "model_said",
        "nearest_exemplar",
    }
    assert isinstance(generated["generated_text"], str) and 0 <= generated["probability"] <= 1
    checked = verify(
        [{"prompt": prompts[1], "completion": completions[1]}, {"prompt": prompts[2], "completion": completions[2]}],
        batch_size=2,
    )
    assert [r["model_said"] for r in checked] == [True, False]
    assert [r["generated_text"] for r in checked] == completions[1:3]
    mixed = verify([prompts[0], {"prompt": prompts[1], "completion": completions[1]}])
    assert mixed[0]["generated_text"] == generated["generated_text"] and mixed[1] == checked[0]


def test_verify_force_decode_and_errors(lm_repo):
    path, prompts, completions = lm_repo
    verify = pipeline("sdm-verify", model=str(path), device="cpu")
    out = verify({"prompt": prompts[3], "completion": completions[3]}, force_decode=True)
    suffix = "<verified>Yes</verified>" if out["verified"] else "<verified>No</verified>"
    assert out["generated_text"].endswith(suffix) and out["generated_text"].count("<verified>") == 1
    with pytest.raises(ValueError, match="'prompt' and 'completion'"):
        verify({"prompt": "x"})
    with pytest.raises(ValueError, match="valid options"):
        verify("x", top_k=3)
    with pytest.raises(ValueError, match="input 0 is .* tokens long"):
        verify({"prompt": "the birch canoe " * 200, "completion": "x"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_path(encoder_repo):  # pragma: no cover - runs on GPU machines only
    path, _, texts = encoder_repo
    clf = pipeline("sdm-text-classification", model=str(path), device="cuda")
    assert clf.sdm_head.support.device.type == "cuda"
    assert clf(texts[:3])[0]["label"] in ("neg", "pos")
