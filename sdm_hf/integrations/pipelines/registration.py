"""Registering ``sdm-text-classification`` and ``sdm-verify`` with transformers' ``PIPELINE_REGISTRY``."""

from __future__ import annotations

import warnings

import transformers
from transformers.pipelines import PIPELINE_REGISTRY

from .text_classification import SDMTextClassificationPipeline
from .verify import SDMVerifyPipeline

__all__ = ["TASKS", "register_pipelines"]

#: task -> (pipeline class, name of the transformers Auto class that loads its model)
TASKS = {
    "sdm-text-classification": (SDMTextClassificationPipeline, "AutoModel"),
    "sdm-verify": (SDMVerifyPipeline, "AutoModelForCausalLM"),
}


def register_pipelines() -> None:
    """Register both tasks with ``PIPELINE_REGISTRY`` (idempotent; ``import sdm_hf`` already calls it)."""
    for task, (pipeline_class, auto_class) in TASKS.items():
        current = PIPELINE_REGISTRY.supported_tasks.get(task, {})
        if current.get("impl") is not pipeline_class:
            PIPELINE_REGISTRY.register_pipeline(
                task, pipeline_class=pipeline_class, pt_model=getattr(transformers, auto_class), type="text"
            )


def register_or_warn() -> None:
    """:func:`register_pipelines`, a failure reported as a ``RuntimeWarning`` (``import sdm_hf`` still works)."""
    try:
        register_pipelines()
    except Exception as err:  # reported; the rest of sdm_hf works without the tasks
        warnings.warn(
            f"sdm_hf could not register its pipeline tasks ({type(err).__name__}: {err}); "
            "call sdm_hf.integrations.pipelines.register_pipelines() to see the full error",
            RuntimeWarning,
            stacklevel=2,
        )
