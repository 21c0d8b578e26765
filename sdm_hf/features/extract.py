"""Pooled hidden-state features from any Hugging Face model (the SDM head's input).

``extract_features(model, tokenizer, texts, pooling=...)`` runs the model without gradients,
in batches, and pools one hidden-state layer:

* ``"mean"``: mean over the non-padding tokens;
* ``"last"``: the last non-padding token (decoder LMs; padding side is handled);
* ``"cls"``: the first (non-padding) token;
* ``"mean_last"``: ``concat(mean, last)`` (twice the hidden width).

Only the model's body runs: for a model with a head (``*ForCausalLM``, ``*ForMaskedLM``,
``*ForSequenceClassification``) that is ``model.base_model``, so a causal LM's vocabulary
projection (for Gemma 3, 262k logits per token) is never computed. For an intermediate layer of
a decoder-layer stack the forward pass stops right after that layer.

It also accepts a ``sentence_transformers.SentenceTransformer`` (``tokenizer=None``), whose own
pooling then applies. Texts may be a list, a tuple or a ``datasets`` column. With
``distributed=True`` the processes of an ``accelerate launch`` run share the texts
(:mod:`sdm_hf.features.distributed`).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from ..search.index import resolve_device

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "extract_features",
    "pool_hidden_states",
    "model_body",
    "num_hidden_layers",
    "resolve_max_length",
    "POOLINGS",
]

POOLINGS = ("mean", "last", "cls", "mean_last")


def pool_hidden_states(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool ``[B, T, H]`` hidden states with a ``[B, T]`` 0/1 attention mask.

    Padding positions never reach the result (not even as NaN: they are selected out, not
    multiplied by zero). A row without any non-padding token pools to zeros for ``"mean"``.

    Returns:
        ``[B, H]`` (or ``[B, 2H]`` for ``"mean_last"``) float32.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    hidden = hidden.float()
    valid = attention_mask.bool()
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    positions = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[:2])
    if pooling == "cls":  # the first non-padding position (position 0 unless the batch is left-padded)
        first_index = torch.where(valid, positions, torch.full_like(positions, hidden.shape[1])).min(dim=1).values
        return hidden[rows, first_index.clamp(max=hidden.shape[1] - 1)]
    keep = valid.unsqueeze(-1)
    mean = torch.where(keep, hidden, 0.0).sum(1) / keep.sum(1).clamp(min=1).float()
    if pooling == "mean":
        return mean
    # last non-padding position, whichever side the padding is on
    last_index = torch.where(valid, positions, torch.full_like(positions, -1)).max(dim=1).values
    last = hidden[rows, last_index.clamp(min=0)]
    return last if pooling == "last" else torch.cat([mean, last], dim=1)


def _is_sentence_transformer(model) -> bool:
    return type(model).__name__ == "SentenceTransformer" and hasattr(model, "encode")


def model_body(model: torch.nn.Module) -> torch.nn.Module:
    """The module of ``model`` that computes its hidden states, without any task head.

    For a transformers model with a head this is ``model.base_model`` (``Gemma3ForCausalLM.model``,
    ``LlamaForCausalLM.model``, ``BertForSequenceClassification.bert``); a bare body
    (``BertModel``) is returned as is. A PEFT wrapper is unwrapped first (its adapters live inside
    the wrapped model, so they still apply). Any other module is returned unchanged.

    Args:
        model: a ``transformers.PreTrainedModel``, a PEFT model, or any ``torch.nn.Module``.

    Returns:
        The body module (possibly ``model`` itself).
    """
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
    """``num_hidden_layers`` of ``model``'s (text) config, or None when the config does not say.

    ``output_hidden_states`` then has ``num_hidden_layers + 1`` entries: 0 is the embedding
    output and ``num_hidden_layers`` (= -1) the final layer's output after the final norm.
    """
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
    """The truncation length :func:`extract_features` uses.

    Args:
        model: the model (its ``config.max_position_embeddings`` is the fallback).
        tokenizer: the tokenizer (its ``model_max_length`` is the default), or None.
        max_length: an explicit limit; returned unchanged when given.

    Returns:
        ``max_length``, else the tokenizer's ``model_max_length`` when it is a real limit, else
        the model's ``max_position_embeddings``, else 512.
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
    """Raise unless ``layer`` indexes one of the ``n_layers + 1`` hidden states (any int when unknown)."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int, got {type(layer).__name__}")
    if n_layers is not None and not -(n_layers + 1) <= layer <= n_layers:
        raise ValueError(
            f"layer={layer} is out of range for {type(model).__name__} with {n_layers} hidden layers: pass "
            f"-{n_layers + 1} <= layer <= {n_layers} (0 = embeddings, {n_layers} or -1 = final layer after the norm)"
        )


class _StopForward(Exception):
    """Raised by a forward hook once the requested layer's output is captured (ends the forward early)."""


def _explicit_inputs(module) -> set[str]:
    """Names ``module.forward`` declares explicitly (not through ``**kwargs``)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
        return set()
    return {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _recorded_layer_class(body):
    """The module class (and output index) whose outputs transformers records as ``hidden_states``.

    In transformers 5 a body's forward collects ``hidden_states`` with hooks on the modules named
    by its ``_can_record_outputs["hidden_states"]``: entry 0 is the first such module's input,
    entry ``i`` its ``i``-th call's output (the last one replaced by ``last_hidden_state``).
    Returns ``(cls, index)`` for a plain class spec, else None (no early stop for that model).
    """
    specs = getattr(body, "_can_record_outputs", None)
    if not isinstance(specs, dict):
        return None
    spec = specs.get("hidden_states")
    if isinstance(spec, type):
        return spec, 0
    target = getattr(spec, "target_class", None)
    if (
        isinstance(target, type)
        and getattr(spec, "layer_name", None) is None
        and getattr(spec, "class_name", None) is None
        and getattr(spec, "capture_initial_hidden_state", True)
        and getattr(spec, "num_hidden_layers_key", "num_hidden_layers") == "num_hidden_layers"
    ):
        return target, int(getattr(spec, "index", 0))
    return None


def _early_stop_layers(body, n_layers: int | None):
    """``(layers, output_index)`` when ``hidden_states[L]`` (0 <= L < n) is exactly ``layers[L-1]``'s
    output (``layers[0]``'s input for L = 0), else None.

    That holds when the body records its hidden states from one module class, has a ``layers``
    ``ModuleList`` of exactly ``num_hidden_layers`` modules of that class, and no other module of
    that class.
    """
    if n_layers is None:
        return None
    recorded = _recorded_layer_class(body)
    layers = getattr(body, "layers", None)
    if recorded is None or not isinstance(layers, torch.nn.ModuleList) or len(layers) != n_layers:
        return None
    cls, index = recorded
    if not all(isinstance(m, cls) for m in layers):
        return None
    if sum(isinstance(m, cls) for m in body.modules()) != n_layers:
        return None
    return layers, index


def _selects_hidden_states(body) -> bool:
    """Whether ``output_hidden_states=[i]`` keeps only entry ``i`` (transformers' recorded outputs;
    the other entries are returned as None), which saves holding every layer's states."""
    specs = getattr(body, "_can_record_outputs", None)
    if not isinstance(specs, dict) or "hidden_states" not in specs:
        return False
    try:
        from transformers.utils.output_capturing import selected_hidden_states  # noqa: F401
    except ImportError:  # pragma: no cover - older transformers: keep them all
        return False
    return True


def _stop_after(layers, layer: int, index: int, run):
    """Run ``run()`` until ``hidden_states[layer]`` is produced; return it (``[B, T, H]``)."""
    captured = {}
    if layer == 0:

        def hook(module, args, kwargs):
            captured["h"] = args[0] if args else kwargs.get("hidden_states")
            raise _StopForward

        handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    else:

        def hook(module, args, output):
            captured["h"] = output[index] if isinstance(output, (tuple, list)) else output
            raise _StopForward

        handle = layers[layer - 1].register_forward_hook(hook)
    try:
        run()
    except _StopForward:
        pass
    finally:
        handle.remove()
    if captured.get("h") is None:
        raise RuntimeError(f"decoder layer {layer} did not run; pass a model whose body runs its `layers` in order")
    return captured["h"]


def _tokenize(tokenizer, texts: list[str], limit: int):
    """Token ids (and token type ids when the tokenizer makes them) per text, cut to ``limit``.

    Returns ``(ids, type_ids or None, number of texts that were truncated)``.
    """
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
    """``[len(rows), width]`` long tensor of the rows padded with ``value`` on the left or right
    (torch's ``pad_sequence``; ``width`` may exceed the longest row)."""
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
    """Batched, no-grad pooled features of ``texts``.

    Texts are tokenized once, sorted by length into batches (less padding; the result is in the
    input order) and padded on the tokenizer's ``padding_side`` with its pad token, or with its
    eos token when it has none (the tokenizer is not modified). Only the model's body runs (see
    :func:`model_body`): a causal LM's vocabulary projection is skipped. For a decoder LM whose
    body is a ``layers`` stack, an intermediate ``layer`` stops the forward after that layer; the
    result equals ``output_hidden_states=True``'s ``hidden_states[layer]``. For left-padded
    batches of a generative model, position ids count from each text's first token (as
    ``generate`` does), so features do not depend on the amount of padding.

    Args:
        model: a transformers model (any that returns ``hidden_states``: ``AutoModel``,
            ``AutoModelForCausalLM`` such as Gemma 3 or Llama), or a ``SentenceTransformer`` with
            ``tokenizer=None``.
        tokenizer: the model's tokenizer (None for a SentenceTransformer).
        texts: N strings (list, tuple or a ``datasets`` column).
        pooling: one of :data:`POOLINGS`.
        layer: which ``hidden_states`` entry to pool: 0 = the embeddings, ``i`` = the output of
            layer ``i``, -1 (= ``num_hidden_layers``) = the final layer after the final norm;
            negative values count from the end. Must lie in
            ``[-(num_hidden_layers + 1), num_hidden_layers]``.
        batch_size: texts per forward pass.
        max_length: truncation length (default: the tokenizer's ``model_max_length``, see
            :func:`resolve_max_length`); longer texts are truncated and a single warning says
            how many.
        device: where the model runs (default: where its parameters are).
        progress: show a tqdm bar.
        distributed: in a run of several processes (``accelerate launch``, ``torchrun``), share
            the work: every process passes the same texts, computes a shard and gets all N
            features back in order (see :mod:`sdm_hf.features.distributed`; ``device`` then
            defaults to each process's own, ``PartialState().device``). With one process it
            changes nothing. Off by default: a process computing its own texts (a pipeline's
            batch) must not wait for the others.

    Returns:
        ``[N, H]`` (``[N, 2H]`` for ``"mean_last"``) float32 CPU tensor.

    Raises:
        ValueError: empty ``texts``, bad ``pooling``/``batch_size``/``max_length``, ``layer`` out of
            range, a model without ``hidden_states``, or padding needed with a tokenizer that has
            neither a pad nor an eos token.
        TypeError: a text is not a string.

    Example::

        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(path); tokenizer = AutoTokenizer.from_pretrained(path)
        x = extract_features(model, tokenizer, ["a statement", "another"], pooling="mean_last", layer=9)  # [2, 2H]

        # script.py, run as `accelerate launch --num_processes 2 script.py` (2 GPUs; on CPUs:
        # `torchrun --nproc_per_node 2 script.py`): each process embeds half, all get all N rows
        x = extract_features(model, tokenizer, texts, distributed=True)  # [N, H] on every process
    """
    texts = as_texts(texts)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed must be True or False, got {distributed!r}")
    if distributed:
        from .distributed import features_across_processes, launched_processes

        if launched_processes() > 1:  # each process a shard (one process: the plain path below)
            shard = partial(extract_features, model, tokenizer, pooling=pooling, layer=layer, max_length=max_length)
            return features_across_processes(
                texts,
                lambda part, show, on: shard(part, batch_size=batch_size, device=on, progress=show),
                device,
                progress,
            )
    if _is_sentence_transformer(model):
        if tokenizer is not None:
            raise ValueError("pass tokenizer=None with a SentenceTransformer (it has its own)")
        kwargs = {"device": str(resolve_device(device))} if device is not None else {}
        encoder: Any = model  # a SentenceTransformer: nn.Module's typed attributes do not include encode
        out = encoder.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=progress, **kwargs)
        return out.detach().float().cpu()
    if tokenizer is None:
        raise ValueError("tokenizer is required for a transformers model")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    body = model_body(model)
    n_layers = num_hidden_layers(body)
    check_layer(model, layer, n_layers)
    if device is not None:
        model = model.to(resolve_device(device))
    run_device = next(model.parameters()).device
    limit = resolve_max_length(model, tokenizer, max_length)
    target = layer % (n_layers + 1) if n_layers is not None else layer
    stack = _early_stop_layers(body, n_layers) if n_layers is not None and target < n_layers else None
    accepted = _explicit_inputs(body)
    select = [layer] if _selects_hidden_states(body) else True
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
                hidden = _stop_after(
                    layers, target, index, lambda inputs=inputs: body(**inputs, output_hidden_states=False, **options)
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
