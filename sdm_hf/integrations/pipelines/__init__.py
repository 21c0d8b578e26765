"""``pipeline("sdm-verify")`` and ``pipeline("sdm-text-classification")``.

``import sdm_hf`` registers both tasks with transformers' ``PIPELINE_REGISTRY`` as soon as
``transformers.pipelines`` is imported (see :mod:`sdm_hf.integrations.pipelines.registration`). Each loads
the model as usual and its SDM head from the model repository's ``sdm_head/`` subfolder, at
the revision the model was loaded from and with the caller's token, or from an explicit
``sdm_head=`` (an :class:`~sdm_hf.SDMHead`, a folder or a Hub repo id — needed for PEFT
adapter repositories). Both follow transformers' Pipeline contract: strings, lists,
``datasets`` columns, ``KeyDataset`` and generators, ``batch_size`` and ``num_workers`` work as
in any transformers pipeline.

The pipeline classes are imported on first use, so that this package (imported by
``import sdm_hf``) does not import ``transformers.pipelines``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .registration import register_pipelines, register_when_transformers_pipelines_loads

if TYPE_CHECKING:
    from .text_classification import SDMTextClassificationPipeline
    from .verify import SDMVerifyPipeline

__all__ = [
    "SDMTextClassificationPipeline",
    "SDMVerifyPipeline",
    "register_pipelines",
    "register_when_transformers_pipelines_loads",
]

_LAZY = {
    "SDMTextClassificationPipeline": "text_classification",
    "SDMVerifyPipeline": "verify",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
