"""Helpers shared by the test modules (the rest of tests/*_fixtures.py and tests/lm/fixtures.py
move here as the tests come to mirror the package tree)."""

import torch
from transformers import BertConfig, BertModel


def tiny_bert(hidden: int = 16) -> BertModel:
    """A one-layer BERT built from a config (vocabulary 50, ``hidden`` wide), seeded: the same
    weights on every call."""
    config = BertConfig(
        vocab_size=50,
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return BertModel(config)
