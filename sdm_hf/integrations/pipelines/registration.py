"""Registering ``sdm-text-classification`` and ``sdm-verify`` with transformers' ``PIPELINE_REGISTRY``.

The registry lives in ``transformers.pipelines``, whose import brings in most of transformers; so
``import sdm_hf`` does not import it but calls :func:`register_when_transformers_pipelines_loads`:
it registers at once when ``transformers.pipelines`` is already imported, else a ``sys.meta_path``
finder registers the tasks right after that module loads (e.g. on ``from transformers import
pipeline``) and removes itself. Why a hook and not an import: importing ``transformers.pipelines``
in every ``import sdm_hf`` costs seconds per process (docs/benchmarks.md).
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings
from typing import Any

__all__ = ["TASKS", "register_pipelines", "register_when_transformers_pipelines_loads", "RegisterOnImport"]

TARGET = "transformers.pipelines"

#: task -> (pipeline class as a dotted path, name of the transformers Auto class that loads its model)
TASKS = {
    "sdm-text-classification": (
        "sdm_hf.integrations.pipelines.text_classification.SDMTextClassificationPipeline",
        "AutoModel",
    ),
    "sdm-verify": ("sdm_hf.integrations.pipelines.verify.SDMVerifyPipeline", "AutoModelForCausalLM"),
}


def register_pipelines() -> None:
    """Register ``sdm-verify`` and ``sdm-text-classification`` now (idempotent); this imports
    ``transformers.pipelines`` but not the pipeline classes.

    The classes are registered as dotted paths, as transformers registers its own tasks: the
    registry resolves them on ``pipeline(task)``. That keeps registration free of imports of
    sdm_hf's pipeline modules, which itself import ``transformers.pipelines`` (registration
    may run in the middle of that import). ``PIPELINE_REGISTRY.register_pipeline`` only takes
    classes, so the entries are written into its ``supported_tasks`` table directly.
    """
    import transformers
    from transformers.pipelines import PIPELINE_REGISTRY

    for task, (impl, auto_class) in TASKS.items():
        entry = {"impl": impl, "pt": (getattr(transformers, auto_class),), "type": "text"}
        if PIPELINE_REGISTRY.supported_tasks.get(task) != entry:
            PIPELINE_REGISTRY.supported_tasks[task] = entry


def _register_or_warn() -> None:
    # runs inside the import of transformers.pipelines: a failure must not break that import
    try:
        register_pipelines()
    except Exception as err:  # reported; the user's import of transformers goes on
        warnings.warn(
            f"sdm_hf could not register its pipeline tasks ({type(err).__name__}: {err}); "
            "call sdm_hf.integrations.pipelines.register_pipelines() to see the full error",
            RuntimeWarning,
            stacklevel=2,
        )


class _RegisteringLoader(importlib.abc.Loader):
    """Delegates to the real loader of ``transformers.pipelines``, then registers the tasks."""

    def __init__(self, loader: Any):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        _remove_hooks()
        self._loader.exec_module(module)
        _register_or_warn()

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class RegisterOnImport(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` finder that only watches for ``transformers.pipelines``: it finds the
    module with the other finders and wraps its loader so that the SDM tasks are registered
    as soon as the module has loaded. It removes itself when that happens."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        for finder in list(sys.meta_path):
            if isinstance(finder, RegisterOnImport):
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def _remove_hooks() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, RegisterOnImport)]


def register_when_transformers_pipelines_loads() -> None:
    """Register now if ``transformers.pipelines`` is imported, else as soon as it is (what
    ``import sdm_hf`` does; idempotent)."""
    if TARGET in sys.modules:
        _register_or_warn()
    elif not any(isinstance(f, RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, RegisterOnImport())
