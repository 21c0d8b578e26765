"""SDM language models. So far: control tokens and the verification head's features
(:mod:`sdm_hf.lm.encoding`); the trainer is still to come."""

from .encoding import ControlTokens, format_document, verification_features

__all__ = ["ControlTokens", "format_document", "verification_features"]
