"""Features of several models composed into one matrix ``[block 0 | block 1 | ...]``, ``(N, D_0 + ... +
D_{K-1})``, with a recorded layout (:mod:`sdm_hf.features.layout`) for ``SDMConfig(feature_blocks=...)``.

Nothing is rescaled here (normalisation statistics must come from the head's training split): fit heads on
composed features with ``SDMConfig(normalization="feature")``, since blocks' scales can differ by orders of
magnitude and one scalar deviation would shrink the small-scale blocks towards zero.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from .cache import cached_with_settings
from .extract import as_texts, extract_with_settings
from .layout import DESCRIPTION_KEYS, layout_of
from .model_identity import name_and_revision
from .settings import FeatureSettings, is_sentence_transformer, resolve_settings

__all__ = ["FeatureEncoder", "ComposedFeatures", "extract_composed_features", "compose_features"]


@dataclass
class FeatureEncoder:
    """One block of a composition: a model, its tokenizer and how its features are pooled.

    Args:
        model: a transformers model or a ``SentenceTransformer`` (``tokenizer=None``; its own pooling applies
            and ``pooling`` / ``layer`` are recorded as None).
        pooling: ``"mean"``, ``"last"``, ``"cls"`` or ``"mean_last"`` (twice the hidden width).
        layer: hidden-state layer to pool (0 = embeddings, -1 = final layer).
        max_length: truncation length in tokens (default: the tokenizer's ``model_max_length``).
        batch_size: texts per forward pass for this model.
        name: the model's name in the layout (default: the id :func:`~sdm_hf.load_causal_lm` recorded, else
            ``config._name_or_path``; required with ``cache=True`` for a model built from a config).
        revision: the weights' version in the layout (default: recorded by ``load_causal_lm``, else
            ``config._commit_hash``).

    Example:
        >>> FeatureEncoder(model=None, pooling="mean_last", layer=9).layer
        9
    """

    model: Any
    tokenizer: Any = None
    pooling: str = "mean"
    layer: int = -1
    max_length: int | None = None
    batch_size: int = 32
    name: str | None = None
    revision: str | None = None


class ComposedFeatures(NamedTuple):
    """``features`` ``(N, D_0 + ... + D_{K-1})`` float32 CPU and ``layout``, K JSON-safe block dicts in
    column order (unpacks as ``x, layout = ...``)."""

    features: torch.Tensor
    layout: list[dict]


_ENCODER_FIELDS = tuple(f.name for f in fields(FeatureEncoder))


def _as_encoder(spec, k: int) -> FeatureEncoder:
    if isinstance(spec, FeatureEncoder):
        return spec
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - set(_ENCODER_FIELDS))
        if unknown or "model" not in spec:
            raise ValueError(
                f"encoder {k}: a dict needs 'model' and may hold {list(_ENCODER_FIELDS)}; "
                + (f"unknown key(s) {unknown}" if unknown else "'model' is missing")
            )
        return FeatureEncoder(**spec)
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        return FeatureEncoder(model=spec[0], tokenizer=spec[1])
    if is_sentence_transformer(spec):
        return FeatureEncoder(model=spec)
    raise TypeError(
        f"encoder {k} is {type(spec).__name__}; pass a (model, tokenizer) pair, a FeatureEncoder, a dict "
        "of FeatureEncoder fields or a SentenceTransformer"
    )


def _check_encoder(encoder: FeatureEncoder, k: int) -> tuple[dict, FeatureSettings]:
    """Validate ``encoder`` before any model runs; return its block description and settings."""
    where = f"encoder {k}"
    if not isinstance(encoder.model, torch.nn.Module):
        raise TypeError(f"{where}: model must be a torch.nn.Module, got {type(encoder.model).__name__}")
    batch = encoder.batch_size
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"{where}: batch_size must be an integer >= 1, got {batch!r}")
    for key in ("name", "revision"):
        value = getattr(encoder, key)
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{where}: {key} must be a string or None, got {value!r}")
    if isinstance(encoder.layer, bool) or not isinstance(encoder.layer, int):
        raise TypeError(f"{where}: layer must be an integer, got {encoder.layer!r}")
    if encoder.tokenizer is None and not is_sentence_transformer(encoder.model):
        raise ValueError(f"{where}: a transformers model needs its tokenizer: pass (model, tokenizer)")
    try:
        settings = resolve_settings(
            encoder.model,
            encoder.tokenizer,
            pooling=encoder.pooling,
            layer=encoder.layer,
            max_length=encoder.max_length,
        )
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    name, revision = name_and_revision(encoder.model, encoder.name, encoder.revision)
    description = {
        "model": name,
        "revision": revision,
        "pooling": settings.pooling,
        "layer": None if settings.sentence_transformer else encoder.layer,
        "max_length": settings.max_length,
    }
    return description, settings


def compose_features(blocks: Sequence, descriptions: Sequence[Mapping | None] | None = None) -> ComposedFeatures:
    """Concatenate K feature blocks of the same N rows into ``(N, sum D_k)``, in order (features computed
    beforehand give the same matrix and layout as :func:`extract_composed_features`).

    Args:
        blocks: K tensors or numpy arrays, each ``(N, D_k)`` of real numbers.
        descriptions: K dicts with any of ``"model"``, ``"revision"``, ``"pooling"``, ``"layer"``,
            ``"max_length"`` (recorded in the layout), or None.

    Returns:
        :class:`ComposedFeatures`: float32 CPU features and their layout.

    Raises:
        ValueError: no blocks, a block that is not 2-D, blocks with different row counts, or a
            description list of another length. TypeError: a block that is not an array of numbers.

    Example:
        >>> x, layout = compose_features([torch.zeros(4, 3), torch.ones(4, 2)], [{"model": "a"}, {"model": "b"}])
        >>> tuple(x.shape), [(b["model"], b["start"], b["stop"]) for b in layout]
        ((4, 5), [('a', 0, 3), ('b', 3, 5)])
    """
    if isinstance(blocks, (torch.Tensor, np.ndarray)) or not isinstance(blocks, Sequence):
        raise TypeError(f"blocks must be a list of [N, D_k] tensors, got {type(blocks).__name__}")
    if not blocks:
        raise ValueError("blocks is empty: pass at least one [N, D_k] feature tensor")
    tensors: list[torch.Tensor] = []
    for k, block in enumerate(blocks):
        if isinstance(block, np.ndarray):
            if not np.issubdtype(block.dtype, np.number) or np.issubdtype(block.dtype, np.complexfloating):
                raise TypeError(f"block {k} must hold real numbers, got numpy dtype {block.dtype}")
            block = torch.from_numpy(np.ascontiguousarray(block))
        if not isinstance(block, torch.Tensor):
            raise TypeError(f"block {k} must be a torch tensor or numpy array, got {type(block).__name__}")
        if block.is_complex() or block.dtype == torch.bool:
            raise TypeError(f"block {k} must hold real numbers, got {block.dtype}")
        if block.dim() != 2 or block.shape[1] < 1:
            raise ValueError(f"block {k} must be [N, D] with D >= 1, got shape {tuple(block.shape)}")
        if tensors and block.shape[0] != tensors[0].shape[0]:
            raise ValueError(
                f"block {k} has {block.shape[0]} rows but block 0 has {tensors[0].shape[0]}: every block must "
                "describe the same texts, in the same order"
            )
        tensors.append(block.detach().to("cpu", torch.float32))
    if descriptions is not None and (isinstance(descriptions, Mapping) or len(descriptions) != len(tensors)):
        count = "a dict" if isinstance(descriptions, Mapping) else len(descriptions)
        raise ValueError(f"got {len(tensors)} blocks but {count} descriptions: pass one dict (or None) per block")
    layout = layout_of([t.shape[1] for t in tensors], descriptions)
    return ComposedFeatures(torch.cat(tensors, dim=1).contiguous(), layout)


def extract_composed_features(
    encoders: Sequence,
    texts: Iterable[str],
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    distributed: bool = False,
    cache: bool = False,
    cache_dir: str | Path | None = None,
) -> ComposedFeatures:
    """Features of ``texts`` from K models, concatenated in the given order, with their layout.

    Block k is ``extract_features`` with encoder k's settings, bit for bit; every encoder is checked before
    the first model runs.

    Args:
        encoders: K >= 1 encoders, each a ``(model, tokenizer)`` pair (mean pooling of the final
            layer), a :class:`FeatureEncoder`, a dict of its fields, or a SentenceTransformer.
        texts: N strings (list, tuple or a ``datasets`` column).
        device: where every model runs (default: where its parameters are).
        progress: show a tqdm bar per model.
        distributed: share the work between the processes of a multi-process run (as
            ``extract_features(..., distributed=True)``).
        cache: read and write each block through :func:`~sdm_hf.cached_features`.
        cache_dir: the cache root with ``cache=True`` (default: ``default_cache_dir()``).

    Returns:
        :class:`ComposedFeatures` ``(features, layout)``: ``(N, D_0 + ... + D_{K-1})`` float32 CPU features
        and K block dicts ``{"model", "revision", "pooling", "layer", "max_length", "dim", "start", "stop"}``
        (``layer`` as passed, ``max_length`` as resolved). Fit a head with
        ``SDMConfig(input_dim=features.shape[1], feature_blocks=layout, normalization="feature")``.

    Raises:
        ValueError: no encoders, empty texts, a bad pooling / layer / batch size / max length, a
            transformers model without a tokenizer, ``cache=True`` for a model without a name, or
            a block whose row count is not N. TypeError: an encoder of an unsupported kind, a
            model that is not a ``torch.nn.Module``, a text that is not a string.

    Example::

        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
        minilm = (AutoModel.from_pretrained(p1), AutoTokenizer.from_pretrained(p1))
        gemma = FeatureEncoder(AutoModelForCausalLM.from_pretrained(p2), AutoTokenizer.from_pretrained(p2),
                               pooling="mean_last", layer=9)
        x, layout = extract_composed_features([minilm, gemma], texts)   # [N, 384 + 1280]
        cfg = SDMConfig(input_dim=x.shape[1], feature_blocks=layout, normalization="feature")
    """
    if isinstance(encoders, (str, bytes, Mapping, FeatureEncoder)) or not isinstance(encoders, Sequence):
        raise TypeError(f"encoders must be a list of encoders, got {type(encoders).__name__}")
    if not encoders:
        raise ValueError("encoders is empty: pass at least one (model, tokenizer) pair or FeatureEncoder")
    if not isinstance(cache, bool):
        raise TypeError(f"cache must be True or False, got {cache!r}")
    texts = as_texts(texts)
    specs = [_as_encoder(spec, k) for k, spec in enumerate(encoders)]
    checked = [_check_encoder(e, k) for k, e in enumerate(specs)]
    descriptions = [description for description, _ in checked]
    if cache:
        nameless = [k for k, d in enumerate(descriptions) if not d["model"]]
        if nameless:
            raise ValueError(
                f"encoder(s) {nameless} have no name for the feature cache (a model built from a config): "
                "pass FeatureEncoder(..., name=...), or cache=False"
            )
    blocks = []
    for k, (encoder, (description, settings)) in enumerate(zip(specs, checked)):
        options: dict[str, Any] = dict(
            batch_size=encoder.batch_size, device=device, progress=progress, distributed=distributed
        )
        if cache:
            block = cached_with_settings(
                encoder.model,
                encoder.tokenizer,
                texts,
                settings,
                model_id=description["model"],
                revision=description["revision"],
                cache_dir=cache_dir,
                **options,
            )
        else:
            block = extract_with_settings(encoder.model, encoder.tokenizer, texts, settings, **options)
        if not isinstance(block, torch.Tensor) or block.dim() != 2 or block.shape[0] != len(texts):
            raise ValueError(
                f"encoder {k} returned features of shape {tuple(getattr(block, 'shape', ()))} for {len(texts)} "
                "texts; expected [N, D]"
            )
        blocks.append(block)
    return compose_features(blocks, [{key: d[key] for key in DESCRIPTION_KEYS} for d in descriptions])
