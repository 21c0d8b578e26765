"""The feature recipe of one extraction (hidden-state layer, pooling, truncation length), validated and
resolved once by :func:`resolve_settings` so that extraction, cache keys and layouts cannot disagree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "POOLINGS",
    "FeatureSettings",
    "resolve_settings",
    "is_sentence_transformer",
    "model_body",
    "num_hidden_layers",
    "resolve_max_length",
    "check_layer",
]

POOLINGS = ("mean", "last", "cls", "mean_last")


def is_sentence_transformer(model) -> bool:
    """Whether ``model`` is a ``sentence_transformers.SentenceTransformer`` (it pools by itself)."""
    return type(model).__name__ == "SentenceTransformer" and hasattr(model, "encode")


def model_body(model: torch.nn.Module) -> torch.nn.Module:
    """The module of ``model`` that computes its hidden states, without any task head: ``model.base_model``
    of a transformers model (e.g. ``LlamaForCausalLM.model``), after unwrapping a PEFT model (its adapters
    still apply); a bare body or any other module is returned as is."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) and hasattr(model, "get_base_model"):
        wrapper: Any = model  # a PEFT model: nn.Module's typed attributes do not include get_base_model
        inner = wrapper.get_base_model()
        if isinstance(inner, PreTrainedModel):
            model = inner
    if isinstance(model, PreTrainedModel):
        body = model.base_model
        if isinstance(body, PreTrainedModel):
            return body
    return model


def num_hidden_layers(model: torch.nn.Module) -> int | None:
    """``num_hidden_layers`` of ``model``'s (text) config, or None when it does not say; ``hidden_states``
    has that + 1 entries (0: embeddings, last = -1: the final layer after the final norm)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    value = getattr(config, "num_hidden_layers", None)
    if value is None and hasattr(config, "get_text_config"):
        try:
            value = getattr(config.get_text_config(), "num_hidden_layers", None)
        except (AttributeError, TypeError, ValueError):  # pragma: no cover - exotic configs
            value = None
    return value if isinstance(value, int) and value > 0 else None


def resolve_max_length(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None, max_length: int | None = None
) -> int:
    """The truncation length of :func:`~sdm_hf.features.extract.extract_features`: ``max_length``, else the
    tokenizer's ``model_max_length`` when it is a real limit, else ``config.max_position_embeddings``, else 512.

    Raises:
        ValueError: ``max_length`` given but not a positive int.
    """
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive integer or None, got {max_length!r}")
        return max_length
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is None or limit > 1_000_000:  # tokenizers without a limit report a huge number
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 512
    return int(limit)


def check_layer(model, layer, n_layers: int | None) -> None:
    """Raise TypeError (not an int) or ValueError unless ``layer`` indexes one of the ``n_layers + 1`` hidden
    states (any int when ``n_layers`` is None)."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int, got {type(layer).__name__}")
    if n_layers is not None and not -(n_layers + 1) <= layer <= n_layers:
        raise ValueError(
            f"layer={layer} is out of range for {type(model).__name__} with {n_layers} hidden layers: pass "
            f"-{n_layers + 1} <= layer <= {n_layers} (0 = embeddings, {n_layers} or -1 = final layer after the norm)"
        )


@dataclass(frozen=True)
class FeatureSettings:
    """What one extraction computes.

    Attributes:
        pooling: one of :data:`POOLINGS`; None for a SentenceTransformer (its own pooling applies).
        layer: the ``hidden_states`` index, in ``0..num_layers`` when the config gives
            ``num_layers`` (so -1 and ``num_layers`` are the same setting); None for a
            SentenceTransformer.
        max_length: truncation length in tokens (a SentenceTransformer's ``max_seq_length``, or None).
        num_layers: the body's ``num_hidden_layers``, or None when its config does not say.
        sentence_transformer: whether the model is a SentenceTransformer.
    """

    pooling: str | None
    layer: int | None
    max_length: int | None
    num_layers: int | None = None
    sentence_transformer: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-safe dict."""
        return asdict(self)


def resolve_settings(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    *,
    pooling: str = "mean",
    layer: int = -1,
    max_length: int | None = None,
) -> FeatureSettings:
    """Check a feature recipe against ``model`` and ``tokenizer`` and resolve its defaults.

    Args:
        model: a transformers model, a PEFT model or a ``SentenceTransformer``.
        tokenizer: the model's tokenizer; None exactly for a SentenceTransformer.
        pooling: one of :data:`POOLINGS` (ignored for a SentenceTransformer).
        layer: ``hidden_states`` index, ``-(n + 1) <= layer <= n`` for ``n`` hidden layers
            (0 = embeddings, -1 = final layer after the norm; ignored for a SentenceTransformer).
        max_length: truncation length; default :func:`resolve_max_length`.

    Returns:
        The :class:`FeatureSettings` every later step reads.

    Raises:
        ValueError: a tokenizer with a SentenceTransformer or none with a transformers model, an
            unknown pooling, ``layer`` out of range, ``max_length`` not a positive integer.
        TypeError: ``layer`` not an int.
    """
    if is_sentence_transformer(model):
        if tokenizer is not None:
            raise ValueError("pass tokenizer=None with a SentenceTransformer (it has its own)")
        limit = getattr(model, "max_seq_length", None)
        limit = limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None
        return FeatureSettings(pooling=None, layer=None, max_length=limit, sentence_transformer=True)
    if tokenizer is None:
        raise ValueError("tokenizer is required for a transformers model")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    n_layers = num_hidden_layers(model_body(model))
    check_layer(model, layer, n_layers)
    return FeatureSettings(
        pooling=pooling,
        layer=layer % (n_layers + 1) if n_layers is not None else layer,
        max_length=resolve_max_length(model, tokenizer, max_length),
        num_layers=n_layers,
    )
