"""A disk cache for language-model features: :func:`cached_features` is
:func:`~sdm_hf.features.extract.extract_features` storing ``<cache>/features/<key>.safetensors`` plus a
describing ``<key>.json``, each written atomically and the JSON last, so an interrupted run leaves no entry
that a later run trusts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..utils.files import atomic_write_bytes, cache_root, json_text, read_json
from ..utils.logging import get_logger
from .distributed import launched_processes, main_process_cached, texts_sha256
from .extract import as_texts, extract_with_settings
from .model_identity import name_and_revision
from .settings import FeatureSettings, resolve_settings

logger = get_logger(__name__)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["cached_features", "feature_cache_key", "cache_key_of"]

FEATURES_FORMAT = 1


def _parameter_dtype(model) -> str | None:
    try:
        return str(next(model.parameters()).dtype).removeprefix("torch.")
    except (StopIteration, AttributeError, TypeError):
        return None


def feature_cache_key(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    texts: list[str],
    *,
    pooling: str = "mean",
    layer: int = -1,
    max_length: int | None = None,
    model_id: str | None = None,
    revision: str | None = None,
) -> tuple[str, dict]:
    """The key :func:`cached_features` stores ``texts``' features under: a sha256 over canonical JSON of the
    format, model id, revision, parameter dtype, resolved layer / pooling / max length, tokenizer class,
    padding and truncation sides, N and a sha256 of the texts in order.

    Args:
        model, tokenizer, texts, pooling, layer, max_length, model_id, revision: as for :func:`cached_features`.

    Returns:
        ``(hex sha256 key, fields)``: ``fields`` is the JSON-able dict that was hashed.

    Raises:
        ValueError: a bad recipe (:func:`~sdm_hf.features.settings.resolve_settings`), or no model name.
    """
    settings = resolve_settings(model, tokenizer, pooling=pooling, layer=layer, max_length=max_length)
    return cache_key_of(model, tokenizer, texts, settings, model_id=model_id, revision=revision)


def cache_key_of(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    texts: list[str],
    settings: FeatureSettings,
    *,
    model_id: str | None = None,
    revision: str | None = None,
) -> tuple[str, dict]:
    """:func:`feature_cache_key` with the recipe already resolved (``settings``).

    Raises:
        ValueError: the model's name is unknown (built from a config) and ``model_id`` is None.
    """
    model_id, revision = name_and_revision(model, model_id, revision)
    if not model_id:
        raise ValueError(
            f"cannot tell which model this {type(model).__name__} is (its config has no _name_or_path, e.g. it "
            "was built from a config): pass model_id= (and revision= for its weights' version) to cached_features"
        )
    fields = {
        "format": FEATURES_FORMAT,
        "model_id": model_id,
        "revision": revision,
        "dtype": _parameter_dtype(model),
        "layer": settings.layer,
        "pooling": settings.pooling,
        "max_length": settings.max_length,
        "tokenizer_class": None if tokenizer is None else type(tokenizer).__name__,
        "padding_side": getattr(tokenizer, "padding_side", None),
        "truncation_side": getattr(tokenizer, "truncation_side", None),
        "n": len(texts),
        "texts_sha256": texts_sha256(texts),
    }
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest(), fields


class _CorruptEntry(Exception):
    """A feature cache entry that cannot be trusted."""


def _read_entry(weights: Path, meta_path: Path, key: str, fields: dict) -> torch.Tensor:
    from safetensors.torch import load

    try:
        meta = read_json(meta_path)
        data = weights.read_bytes()
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise _CorruptEntry(f"unreadable ({err})") from None
    if not isinstance(meta, dict) or meta.get("key") != key or meta.get("fields") != fields:
        raise _CorruptEntry(f"{meta_path.name} does not describe these features")
    if hashlib.sha256(data).hexdigest() != meta.get("features_sha256"):
        raise _CorruptEntry(f"{weights.name} does not match the checksum in {meta_path.name}")
    try:
        tensors = load(data)
    except Exception as err:  # safetensors raises its own error type for a malformed file
        raise _CorruptEntry(f"not a readable safetensors file ({err})") from None
    features = tensors.get("features")
    dim = meta.get("dim")
    if set(tensors) != {"features"} or features is None or features.dtype != torch.float32:
        raise _CorruptEntry("expected one float32 tensor named 'features'")
    if features.dim() != 2 or tuple(features.shape) != (fields["n"], dim):
        raise _CorruptEntry(f"features have shape {tuple(features.shape)}, expected ({fields['n']}, {dim})")
    return features.clone()  # own the memory: nothing keeps the file's bytes alive


def _write_entry(weights: Path, meta_path: Path, key: str, fields: dict, features: torch.Tensor) -> None:
    from safetensors.torch import save

    weights.parent.mkdir(parents=True, exist_ok=True)
    data = save({"features": features.contiguous()}, metadata={"format": "pt", "key": key})
    meta = {
        "written_by": "sdm_hf",
        "key": key,
        "fields": fields,
        "dim": int(features.shape[1]),
        "dtype": "float32",
        "features_sha256": hashlib.sha256(data).hexdigest(),
    }
    atomic_write_bytes(weights, data)
    atomic_write_bytes(meta_path, json_text(meta).encode("utf-8"))  # last: a .json marks a complete entry


def cached_features(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    texts: Iterable[str],
    *,
    pooling: str = "mean",
    layer: int = -1,
    max_length: int | None = None,
    batch_size: int = 32,
    model_id: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    use_cache: bool = True,
    distributed: bool = False,
) -> torch.Tensor:
    """:func:`~sdm_hf.features.extract.extract_features` with a disk cache keyed by
    :func:`feature_cache_key`: a hit loads the features without running the model; an entry that fails its
    checks (checksum, key, shape) is recomputed, and a failed write is skipped, each logged as a warning.

    Args:
        model, tokenizer, texts, pooling, layer, max_length, batch_size, device, progress: as for
            ``extract_features``.
        model_id: the model's name in the key (default: the id ``load_causal_lm`` recorded, else
            ``config._name_or_path``; required for a model built from a config).
        revision: the weights' version in the key (default: the GGUF sha256 ``load_causal_lm`` recorded, else
            ``config._commit_hash``); pass it when the weights changed in place or in memory.
        cache_dir: the cache root (default: :func:`~sdm_hf.utils.files.default_cache_dir`).
        use_cache: False computes without reading or writing the cache.
        distributed: in a multi-process run, every process passes the same texts and gets all N rows; the
            main process alone reads and writes the cache, a miss is computed by all (one shard each).

    Returns:
        ``(N, H)`` float32 CPU tensor (``(N, 2H)`` for ``"mean_last"``).

    Raises:
        As :func:`~sdm_hf.features.extract.extract_features`; ValueError: no model name (``model_id``);
        TypeError: ``distributed`` not a bool.
    """
    texts = as_texts(texts)
    settings = resolve_settings(model, tokenizer, pooling=pooling, layer=layer, max_length=max_length)
    return cached_with_settings(
        model,
        tokenizer,
        texts,
        settings,
        batch_size=batch_size,
        model_id=model_id,
        revision=revision,
        cache_dir=cache_dir,
        progress=progress,
        device=device,
        use_cache=use_cache,
        distributed=distributed,
    )


def cached_with_settings(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    texts: list[str],
    settings: FeatureSettings,
    *,
    batch_size: int = 32,
    model_id: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    use_cache: bool = True,
    distributed: bool = False,
) -> torch.Tensor:
    """:func:`cached_features` with the recipe already resolved (``settings``); same returns and raises."""
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed must be True or False, got {distributed!r}")

    def compute() -> torch.Tensor:
        return extract_with_settings(
            model,
            tokenizer,
            texts,
            settings,
            batch_size=batch_size,
            device=device,
            progress=progress,
            distributed=distributed,
        )

    if not use_cache:
        return compute()
    key, fields = cache_key_of(model, tokenizer, texts, settings, model_id=model_id, revision=revision)
    folder = cache_root(cache_dir) / "features"
    weights, meta_path = folder / f"{key}.safetensors", folder / f"{key}.json"

    def load() -> torch.Tensor | None:
        if weights.is_file() and meta_path.is_file():
            try:
                return _read_entry(weights, meta_path, key, fields)
            except _CorruptEntry as err:
                logger.warning("feature cache entry %s is corrupt: %s; recomputing", weights, err)
        return None

    def store(features: torch.Tensor) -> None:
        try:
            _write_entry(weights, meta_path, key, fields, features)
        except OSError as err:
            logger.warning("could not write the feature cache entry %s (%s)", weights, err)

    if distributed and launched_processes() > 1:
        return main_process_cached(load, compute, store)  # one reader and writer: the main process
    found = load()
    if found is not None:
        return found
    features = compute()
    store(features)
    return features
