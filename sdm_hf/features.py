"""Pooled hidden-state features from any Hugging Face model (the SDM head's input).

``extract_features(model, tokenizer, texts, pooling=...)`` runs the model without gradients,
in batches, and pools one hidden-state layer:

* ``"mean"``: mean over the non-padding tokens;
* ``"last"``: the last non-padding token (decoder LMs; padding side is handled);
* ``"cls"``: the first token;
* ``"mean_last"``: ``concat(mean, last)`` (twice the hidden width).

It also accepts a ``sentence_transformers.SentenceTransformer`` (``tokenizer=None``), whose own
pooling then applies. Texts may be a list, a tuple or a ``datasets`` column.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from .index import resolve_device

__all__ = ["extract_features", "pool_hidden_states", "POOLINGS"]

POOLINGS = ("mean", "last", "cls", "mean_last")


def pool_hidden_states(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool ``[B, T, H]`` hidden states with a ``[B, T]`` 0/1 attention mask.

    Returns:
        ``[B, H]`` (or ``[B, 2H]`` for ``"mean_last"``) float32.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    hidden = hidden.float()
    mask = mask.float()
    if pooling == "cls":
        return hidden[:, 0]
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if pooling == "mean":
        return mean
    # last non-padding position, whichever side the padding is on
    positions = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[:2])
    last_index = torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index.clamp(min=0)]
    return last if pooling == "last" else torch.cat([mean, last], dim=1)


def _is_sentence_transformer(model) -> bool:
    return type(model).__name__ == "SentenceTransformer" and hasattr(model, "encode")


@torch.no_grad()
def extract_features(
    model,
    tokenizer,
    texts: Iterable[str],
    pooling: str = "mean",
    layer: int = -1,
    batch_size: int = 32,
    max_length: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Batched, no-grad pooled features of ``texts``.

    Args:
        model: a transformers model (any that returns ``hidden_states``), or a
            ``SentenceTransformer`` with ``tokenizer=None``.
        tokenizer: the model's tokenizer (None for a SentenceTransformer).
        texts: N strings (list, tuple or a ``datasets`` column).
        pooling: one of :data:`POOLINGS`.
        layer: which ``hidden_states`` entry to pool (-1 = the final layer).
        batch_size: texts per forward pass.
        max_length: truncation length (default: the tokenizer's ``model_max_length``);
            longer texts are truncated and a single warning says how many.
        device: where the model runs (default: where its parameters are).
        progress: show a tqdm bar.

    Returns:
        ``[N, H]`` (``[N, 2H]`` for ``"mean_last"``) float32 CPU tensor.

    Example::

        from transformers import AutoModel, AutoTokenizer
        model = AutoModel.from_pretrained(path); tokenizer = AutoTokenizer.from_pretrained(path)
        x = extract_features(model, tokenizer, ["a statement", "another"], pooling="mean")  # [2, H]
    """
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: pass at least one string")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if _is_sentence_transformer(model):
        if tokenizer is not None:
            raise ValueError("pass tokenizer=None with a SentenceTransformer (it has its own)")
        kwargs = {"device": str(resolve_device(device))} if device is not None else {}
        out = model.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=progress, **kwargs)
        return out.detach().float().cpu()
    if tokenizer is None:
        raise ValueError("tokenizer is required for a transformers model")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if device is not None:
        model = model.to(resolve_device(device))
    run_device = next(model.parameters()).device
    limit = max_length or getattr(tokenizer, "model_max_length", None)
    if limit is None or limit > 1_000_000:  # tokenizers without a limit report a huge number
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", 512)
    was_training = model.training
    model.eval()
    chunks, truncated = [], 0
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc="features", disable=not progress):
            batch = texts[start : start + batch_size]
            lengths = tokenizer(batch, add_special_tokens=True, truncation=False)["input_ids"]
            truncated += sum(len(ids) > limit for ids in lengths)
            enc = tokenizer(batch, padding=True, truncation=True, max_length=limit, return_tensors="pt").to(run_device)
            outputs = model(**enc, output_hidden_states=True, return_dict=True)
            hidden_states = getattr(outputs, "hidden_states", None)
            if hidden_states is None:
                raise ValueError(
                    f"{type(model).__name__} returned no hidden_states; pass a model that supports "
                    "output_hidden_states=True (e.g. AutoModel / AutoModelForCausalLM)"
                )
            chunks.append(pool_hidden_states(hidden_states[layer], enc["attention_mask"], pooling).cpu())
    finally:
        model.train(was_training)
    if truncated:
        warnings.warn(
            f"{truncated} of {len(texts)} texts were longer than max_length={limit} tokens and were truncated",
            UserWarning,
            stacklevel=2,
        )
    return torch.cat(chunks).float()
