"""SDM language models: contrastive masking, the change-of-base next-token loss, the
document-level verification head and ``SDMTrainer`` (Schmaltz 2025,
*Similarity-Distance-Magnitude Language Models*, arXiv:2510.26183).

Modules, in the layout of TRL's trainers: ``sdm_trainer`` (the trainer), ``sdm_config`` (its
training arguments), ``callbacks`` (the per-epoch steps), ``state`` (what a checkpoint adds),
``distributed`` (what several processes share), ``modeling`` (dropout removal),
``verification`` (the head fit on split halves), and the trainer-free pieces ``data``,
``control`` (control strings, document text), ``masks`` (contrastive masking),
``verification_features``, ``generation``, ``collator`` and ``loss``.
"""

from .collator import ContrastiveMaskingCollator
from .control import ControlTokens, format_document
from .data import Document, prepare_documents
from .loss import sdm_next_token_loss
from .masks import encode_example
from .modeling import disable_dropout
from .verification_features import pool_verification_states, verification_features

# The trainer pulls in transformers.Trainer (and through it accelerate and datasets): imported
# on first use, so that `import sdm_hf` (which registers the pipelines, whose LM verifier needs
# .encoding) does not pay for it. The callbacks (transformers' callback machinery) and the
# checkpoint state are only used with the trainer, so they load with it.
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
