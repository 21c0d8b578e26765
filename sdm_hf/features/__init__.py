"""Features from Hugging Face models for SDM heads: pooled hidden states, a disk cache, several models
composed, and causal-LM loading (GGUF files included)."""

from .cache import cached_features
from .composition import FeatureEncoder, compose_features, extract_composed_features
from .extract import extract_features
from .model_loading import load_causal_lm

__all__ = [
    "extract_features",
    "cached_features",
    "FeatureEncoder",
    "compose_features",
    "extract_composed_features",
    "load_causal_lm",
]
