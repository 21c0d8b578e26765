"""Builders for the pipeline tests (no downloads): a tiny BERT repository with an SDM head over
mean-pooled features, and a tiny Llama repository with a verification head."""

import warnings
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from sdm_hf import SDMConfig, SDMHead
from sdm_hf.features.extract import extract_features
from sdm_hf.lm.control import ControlTokens
from sdm_hf.lm.verification_features import verification_features
from sdm_hf.repository import save_sdm_model
from tests.lm.fixtures import harvard_sentences, tiny_causal_lm, tiny_tokenizer

WORDS = [f"w{i}" for i in range(200)]


def head_on(features, labels, seed=0, **config):
    """A head with a random projection, its support on the first half, calibrated on the rest."""
    head = SDMHead(
        SDMConfig(input_dim=features.shape[1], exemplar_dim=8, alpha=0.9, **config),
        generator=torch.Generator().manual_seed(seed),
    )
    half = features.shape[0] // 2
    head.set_normalization(*SDMHead.normalization_statistics(features))
    head.build_support(features[:half], labels[:half], texts=[f"doc {i}" for i in range(half)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        head.calibrate(features[half:], labels[half:])
    return head


def random_texts(n, seed=1, lengths=(2, 9)):
    """``n`` texts of random words, of random lengths in ``lengths`` (so batches need padding)."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lengths[0], lengths[1], (n,), generator=g).tolist()
    return [" ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (k,), generator=g).tolist()) for k in sizes]


def tiny_encoder(max_length: int = 10):
    """``(model, tokenizer)``: a 1-layer BERT over :data:`WORDS`, built from a config (seeded)."""
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    tokenizer = BertTokenizerFast(vocab=vocab, model_max_length=max_length)  # (transformers 5 ignores vocab_file=)
    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            vocab_size=len(WORDS) + 5,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            max_position_embeddings=16,
        )
    ).eval()
    return model, tokenizer


def build_encoder_repo(root: Path, id2label=None, seed=0):
    """``(repo path, head, texts)``: a 1-layer BERT (max 10 tokens) and a head on its mean features."""
    root.mkdir(parents=True, exist_ok=True)
    model, tokenizer = tiny_encoder()
    texts = random_texts(80)
    feats = extract_features(model, tokenizer, texts, pooling="mean", progress=False)
    labels = torch.arange(80) % 2
    head = head_on(feats, labels, seed=seed, feature_pooling="mean", id2label=id2label or {0: "neg", 1: "pos"})
    save_sdm_model(model, head, root / "repo", tokenizer=tokenizer)
    return root / "repo", head, texts


def build_lm_repo(root: Path):
    """``(repo path, prompts, completions)``: a tiny Llama and a verification head; completions
    alternate negatives (reversed text, ``No``) and positives (``Yes``)."""
    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm(tokenizer)
    sentences = harvard_sentences(60)
    prompts = [f"Repeat: {s}" for s in sentences]
    control = ControlTokens()
    completions = [control.add(s if i % 2 else s[::-1], bool(i % 2)) for i, s in enumerate(sentences)]
    labels = torch.tensor([i % 2 for i in range(60)])
    feats = verification_features(model, tokenizer, prompts, completions)
    head = head_on(feats, labels, feature_pooling="verification", id2label={0: "No", 1: "Yes"})
    save_sdm_model(model, head, root / "repo", tokenizer=tokenizer)
    return root / "repo", prompts, completions
