"""``pipeline("sdm-verify")`` and ``pipeline("sdm-text-classification")``.

Importing this package (which ``import sdm_hf`` does) registers both tasks with transformers'
``PIPELINE_REGISTRY``. Each pipeline loads the model as usual and its SDM head from the model
repository's ``sdm_head/`` subfolder (at the model's revision, with the caller's token), or from
an explicit ``sdm_head=`` (an :class:`~sdm_hf.SDMHead`, a folder or a Hub repo id; needed for PEFT
adapter repositories). Inputs, ``batch_size`` and ``num_workers`` work as in any transformers
pipeline.
"""

from __future__ import annotations

from .registration import register_or_warn, register_pipelines
from .text_classification import SDMTextClassificationPipeline
from .verify import SDMVerifyPipeline

__all__ = ["SDMTextClassificationPipeline", "SDMVerifyPipeline", "register_pipelines"]

register_or_warn()
