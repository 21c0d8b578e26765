"""SDM language models: contrastive masking, the change-of-base next-token loss, the
document-level verification head and ``SDMTrainer`` (Schmaltz 2025, *Similarity-Distance-Magnitude
Language Models*, arXiv:2510.26183; derivation: docs/how_sdm_works.md, section 'SDM language models').
"""

from .collator import ContrastiveMaskingCollator
from .control import ControlTokens, format_document
from .data import Document, prepare_documents
from .loss import sdm_next_token_loss
from .masks import encode_example
from .modeling import disable_dropout
from .verification_features import pool_verification_states, verification_features

# Imported on first use: the trainer, its arguments, callbacks and state pull in transformers.Trainer
# (accelerate, datasets), which `import sdm_hf` (it registers the pipelines) should not pay for.
_LAZY = {
    "SDMTrainer": ".sdm_trainer",
    "exact_match_verifier": ".sdm_trainer",
    "SDMTrainingArguments": ".sdm_config",
    "HardNegativeCallback": ".callbacks",
    "HeadRefreshCallback": ".callbacks",
    "SDMEpochState": ".state",
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
    "HardNegativeCallback",
    "HeadRefreshCallback",
    "SDMEpochState",
    "SDMTrainer",
    "SDMTrainingArguments",
    "disable_dropout",
    "encode_example",
    "exact_match_verifier",
    "format_document",
    "pool_verification_states",
    "prepare_documents",
    "sdm_next_token_loss",
    "verification_features",
]
