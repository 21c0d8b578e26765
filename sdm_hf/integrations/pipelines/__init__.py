"""``pipeline("sdm-verify")`` and ``pipeline("sdm-text-classification")``, registered with transformers'
``PIPELINE_REGISTRY`` on import (which ``import sdm_hf`` does).

The head comes from the model repository's ``sdm_head/`` (at the model's revision, with the caller's token) or
from ``sdm_head=`` (an SDMHead, a folder or a Hub repo id; needed for PEFT adapter repositories).
Usage: docs/serving.md, section 'Pipelines'.
"""

from __future__ import annotations

from .registration import register_or_warn, register_pipelines
from .text_classification import SDMTextClassificationPipeline
from .verify import SDMVerifyPipeline

__all__ = ["SDMTextClassificationPipeline", "SDMVerifyPipeline", "register_pipelines"]

register_or_warn()
