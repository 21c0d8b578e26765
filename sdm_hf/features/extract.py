"""Pooled hidden-state features from any Hugging Face model (the SDM head's input): the model's body runs
without its task head, stopping after the pooled layer where it can (:mod:`sdm_hf.features.layer_capture`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from ..search.index import resolve_device
from .layer_capture import early_stop_layers, explicit_inputs, selects_hidden_states, stop_after
from .pooling import pool_hidden_states
from .settings import FeatureSettings, model_body, resolve_settings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["extract_features", "extract_with_settings", "as_texts"]


def _tokenize(tokenizer, texts: list[str], limit: int):
    """``(ids, type_ids or None, number truncated)`` per text, cut to ``limit`` tokens."""
    full = tokenizer(texts, add_special_tokens=True, truncation=False)
    ids = [list(row) for row in full["input_ids"]]
    types = [list(row) for row in full["token_type_ids"]] if "token_type_ids" in full else None
    long = [i for i, row in enumerate(ids) if len(row) > limit]
    if long:  # only these need re-tokenizing: a text within the limit tokenizes the same either way
        cut = tokenizer([texts[i] for i in long], add_special_tokens=True, truncation=True, max_length=limit)
        for j, i in enumerate(long):
            ids[i] = list(cut["input_ids"][j])
            if types is not None:
                types[i] = list(cut["token_type_ids"][j])
    return ids, types, len(long)


def _pad(rows: list[list[int]], width: int, value: int, left: bool) -> torch.Tensor:
    """``(len(rows), width)`` long tensor of the rows padded with ``value`` on the left or right."""
    seqs = [torch.as_tensor(row, dtype=torch.long) for row in rows]
    out = pad_sequence(seqs, batch_first=True, padding_value=value, padding_side="left" if left else "right")
    extra = width - out.shape[1]
    return F.pad(out, (extra, 0) if left else (0, extra), value=value) if extra > 0 else out


def _pad_token_id(tokenizer) -> int | None:
    """The tokenizer's pad id, else its eos id (decoder tokenizers often lack a pad token)."""
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return None


def as_texts(texts: Iterable[str]) -> list[str]:
    """``texts`` (a list, tuple or ``datasets`` column) as a non-empty list of strings.

    Raises:
        ValueError: no texts. TypeError: an item is not a string (the message names it).
    """
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: pass at least one string")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    return texts


def _can_generate(model) -> bool:
    method = getattr(model, "can_generate", None)
    try:
        return bool(method()) if callable(method) else False
    except (TypeError, AttributeError):  # pragma: no cover - exotic models
        return False


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    texts: Iterable[str],
    pooling: str = "mean",
    layer: int = -1,
    batch_size: int = 32,
    max_length: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    distributed: bool = False,
) -> torch.Tensor:
    """Batched, no-grad pooled features of ``texts``, in input order.

    Texts are batched by length and padded on the tokenizer's ``padding_side`` (pad token, else eos); for
    left padding of a generative model, position ids start at each text's first token, so features do not
    depend on the padding.

    Args:
        model: a transformers model that returns ``hidden_states`` (``AutoModel``,
            ``AutoModelForCausalLM``, a PEFT model), or a ``SentenceTransformer`` (pools by itself).
        tokenizer: the model's tokenizer (None for a SentenceTransformer).
        texts: N strings (list, tuple or a ``datasets`` column).
        pooling: ``"mean"``, ``"last"``, ``"cls"`` or ``"mean_last"`` (``concat(mean, last)``).
        layer: ``hidden_states`` index: 0 = embeddings, ``i`` = output of layer ``i``, -1 = the
            final layer after the final norm; ``-(n + 1) <= layer <= n`` for ``n`` layers.
        batch_size: texts per forward pass.
        max_length: truncation length in tokens (default: the tokenizer's ``model_max_length``);
            one UserWarning counts the truncated texts.
        device: where the model runs (default: where its parameters are).
        progress: show a tqdm bar.
        distributed: in a multi-process run, every process passes the same texts, computes a shard and
            gets all N rows (``device`` defaults to each process's own); off, a process never waits for others.

    Returns:
        ``(N, H)`` float32 CPU tensor (``(N, 2H)`` for ``"mean_last"``).

    Raises:
        ValueError: empty ``texts``, bad ``pooling``/``batch_size``/``max_length``, ``layer`` out of
            range, a model without ``hidden_states``, or padding needed with a tokenizer that has
            neither a pad nor an eos token.
        TypeError: a text is not a string, or ``layer`` not an int.

    Example::

        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(path); tokenizer = AutoTokenizer.from_pretrained(path)
        x = extract_features(model, tokenizer, ["a statement", "another"], pooling="mean_last", layer=9)  # (2, 2H)
        x = extract_features(model, tokenizer, texts, distributed=True)  # under torchrun / accelerate launch
    """
    texts = as_texts(texts)
    settings = resolve_settings(model, tokenizer, pooling=pooling, layer=layer, max_length=max_length)
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


@torch.no_grad()
def extract_with_settings(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    texts: list[str],
    settings: FeatureSettings,
    *,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    progress: bool = True,
    distributed: bool = False,
) -> torch.Tensor:
    """:func:`extract_features` of checked ``texts`` (:func:`as_texts`) with the recipe already resolved
    (:func:`~sdm_hf.features.settings.resolve_settings`); same returns.

    Raises:
        ValueError: bad ``batch_size``, a model without ``hidden_states``, or padding needed with a
            tokenizer that has neither a pad nor an eos token. TypeError: ``distributed`` not a bool.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed must be True or False, got {distributed!r}")
    if distributed:
        from .distributed import features_across_processes, launched_processes

        if launched_processes() > 1:  # each process a shard (one process: the plain path below)
            return features_across_processes(
                texts,
                lambda part, show, on: extract_with_settings(
                    model, tokenizer, part, settings, batch_size=batch_size, device=on, progress=show
                ),
                device,
                progress,
            )
    if settings.sentence_transformer:
        kwargs = {"device": str(resolve_device(device))} if device is not None else {}
        encoder: Any = model  # a SentenceTransformer: nn.Module's typed attributes do not include encode
        out = encoder.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=progress, **kwargs)
        return out.detach().float().cpu()
    if settings.pooling is None or settings.layer is None or settings.max_length is None:
        raise ValueError("settings of a transformers model need pooling, layer and max_length: use resolve_settings")
    pooling, layer, limit, n_layers = settings.pooling, settings.layer, settings.max_length, settings.num_layers
    body = model_body(model)
    if device is not None:
        model = model.to(resolve_device(device))
    run_device = next(model.parameters()).device
    stack = early_stop_layers(body, n_layers) if n_layers is not None and layer < n_layers else None
    accepted = explicit_inputs(body)
    select = [layer] if selects_hidden_states(body) else True
    options = {"use_cache": False} if "use_cache" in accepted else {}
    left = getattr(tokenizer, "padding_side", "right") == "left"
    positions_from_mask = _can_generate(model) and "position_ids" in accepted
    pad_id = _pad_token_id(tokenizer)
    pad_type_id = getattr(tokenizer, "pad_token_type_id", 0) or 0

    ids, type_ids, truncated = _tokenize(tokenizer, texts, limit)
    if "token_type_ids" not in accepted:
        type_ids = None
    order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))  # longest first: memory trouble shows at once
    was_training = model.training
    model.eval()
    chunks = []
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="features", disable=not progress):
            rows = order[start : start + batch_size]
            width = max(1, max(len(ids[i]) for i in rows))
            if pad_id is None and any(len(ids[i]) != width for i in rows):
                raise ValueError(
                    f"{type(tokenizer).__name__} has neither a pad token nor an eos token, so texts of different "
                    "lengths cannot be batched; set tokenizer.pad_token (e.g. to an existing special token) "
                    "or pass batch_size=1"
                )
            input_ids = _pad([ids[i] for i in rows], width, pad_id or 0, left)
            mask = _pad([[1] * len(ids[i]) for i in rows], width, 0, left)
            inputs = {"input_ids": input_ids.to(run_device), "attention_mask": mask.to(run_device)}
            if type_ids is not None:
                inputs["token_type_ids"] = _pad([type_ids[i] for i in rows], width, pad_type_id, left).to(run_device)
            if positions_from_mask and bool((mask[:, 0] == 0).any()):
                position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
                inputs["position_ids"] = position_ids.to(run_device)
            if stack is not None:
                layers, index = stack
                hidden = stop_after(
                    layers, layer, index, lambda inputs=inputs: body(**inputs, output_hidden_states=False, **options)
                )
            else:
                outputs = body(**inputs, output_hidden_states=select, return_dict=True, **options)
                hidden_states = getattr(outputs, "hidden_states", None)
                if hidden_states is None:
                    raise ValueError(
                        f"{type(model).__name__} returned no hidden_states; pass a model that supports "
                        "output_hidden_states=True (e.g. AutoModel / AutoModelForCausalLM)"
                    )
                if not -len(hidden_states) <= layer < len(hidden_states):
                    raise ValueError(
                        f"layer={layer} is out of range: {type(model).__name__} returned {len(hidden_states)} "
                        f"hidden states; pass -{len(hidden_states)} <= layer <= {len(hidden_states) - 1}"
                    )
                hidden = hidden_states[layer]
                if hidden is None:
                    raise ValueError(f"{type(model).__name__} returned no hidden state at layer={layer}")
            chunks.append(pool_hidden_states(hidden, inputs["attention_mask"], pooling).cpu())
    finally:
        model.train(was_training)
    if truncated:
        warnings.warn(
            f"{truncated} of {len(texts)} texts were longer than max_length={limit} tokens and were truncated",
            UserWarning,
            stacklevel=3,  # the caller of the no_grad wrapper
        )
    feats = torch.cat(chunks).float()
    result = torch.empty_like(feats)
    result[torch.as_tensor(order)] = feats
    return result
