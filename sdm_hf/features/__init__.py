"""Features from Hugging Face models: pooling hidden states (:mod:`.extract`), a disk cache keyed
by model, recipe and texts (:mod:`.cache`), several models side by side (:mod:`.composition`,
:mod:`.layout`), loading causal LMs including GGUF files (:mod:`.model_loading`) and sharing the
work across processes (:mod:`.distributed`)."""

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
