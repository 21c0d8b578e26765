"""SDM language models (SPEC Part B): contrastive masking, the change-of-base next-token
loss, the verification head and ``SDMTrainer``."""

from .collator import ContrastiveMaskingCollator
from .data import Document, prepare_documents
from .encoding import ControlTokens, encode_example, format_document, verification_features
from .loss import sdm_next_token_loss
from .sdm_config import SDMTrainingArguments
from .trainer import SDMTrainer, exact_match_verifier

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
