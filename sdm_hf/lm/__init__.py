"""SDM language models (SPEC Part B): contrastive masking, the change-of-base next-token
loss, the verification head and ``SDMTrainer``."""

from .collator import ContrastiveMaskingCollator
from .data import Document, prepare_documents
from .encoding import ControlTokens, encode_example, format_document, verification_features
from .loss import sdm_next_token_loss

# The trainer pulls in transformers.Trainer (and through it accelerate and datasets): imported
# on first use, so that `import sdm_hf` (which registers the pipelines, whose LM verifier needs
# .encoding) does not pay for it.
_LAZY = {
    "SDMTrainer": ".trainer",
    "exact_match_verifier": ".trainer",
    "SDMTrainingArguments": ".sdm_config",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ControlTokens",
    "ContrastiveMaskingCollator",
    "Document",
    "SDMTrainer",
    "SDMTrainingArguments",
    "encode_example",
    "exact_match_verifier",
    "format_document",
    "prepare_documents",
    "sdm_next_token_loss",
    "verification_features",
]
