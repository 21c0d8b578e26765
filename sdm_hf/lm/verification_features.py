"""The verification head's input: hidden states pooled over a document's positions ``0..p``
(Schmaltz 2025, *Similarity-Distance-Magnitude Language Models*, arXiv:2510.26183, Sec. 3.2).

``x = concat(mean_{t<=p} h_t, h_p)`` (``"mean_last"``, the paper's); ``"last"`` and ``"mean"`` keep one half.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ..features.pooling import pool_hidden_states
from .control import ControlTokens, Prompt, format_document, verification_positions

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "VERIFICATION_POOLINGS",
    "verification_feature_pooling",
    "verification_pooling_of",
    "verification_features",
    "forward_options",
    "prefix_features",
    "pool_verification_states",
]


VERIFICATION_POOLINGS = ("mean_last", "last", "mean")


def verification_feature_pooling(pooling: str) -> str:
    """The ``SDMConfig.feature_pooling`` a verification head records for ``pooling`` (one of
    :data:`VERIFICATION_POOLINGS`); raises ValueError for any other.

    Example:
        >>> verification_feature_pooling("mean_last"), verification_feature_pooling("last")
        ('verification', 'verification-last')
    """
    if pooling not in VERIFICATION_POOLINGS:
        raise ValueError(f"verification pooling must be one of {VERIFICATION_POOLINGS}, got {pooling!r}")
    return "verification" if pooling == "mean_last" else f"verification-{pooling}"


def verification_pooling_of(feature_pooling: str | None) -> str:
    """The pooling of a head's recorded ``feature_pooling`` (None counts as ``"verification"``): the inverse
    of :func:`verification_feature_pooling`; raises ValueError for a non-verification pooling."""
    if feature_pooling in (None, "verification"):
        return "mean_last"
    name = str(feature_pooling).removeprefix("verification-")
    if not str(feature_pooling).startswith("verification-") or name not in VERIFICATION_POOLINGS:
        raise ValueError(f"{feature_pooling!r} is not the feature pooling of an LM verification head")
    return name


@torch.no_grad()
def verification_features(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Iterable[Prompt],
    completions: Iterable[str],
    control: ControlTokens | None = None,
    batch_size: int = 8,
    layer: int = -1,
    pooling: str = "mean_last",
) -> torch.Tensor:
    """Verification-head features of N ``(prompt, completion)`` pairs, in eval mode.

    Each pair is chat-formatted with its control suffix replaced (nothing after the opening tag is read)
    and the hidden states of ``layer`` are pooled over ``0..p`` by ``pooling`` (module docstring).

    Returns:
        ``(N, 2H)`` float32 CPU tensor (``(N, H)`` for ``"last"`` / ``"mean"``).

    Raises:
        ValueError: no pairs, an unknown ``pooling``, or a document whose tag cannot be located.
    """
    control = control or ControlTokens()
    texts = [format_document(tokenizer, p, control.add(c, True)) for p, c in zip(prompts, completions)]
    if not texts:
        raise ValueError("no documents to verify")
    ids, _ = verification_positions(tokenizer, texts, control)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return prefix_features(model, ids, pad, batch_size=batch_size, layer=layer, pooling=pooling)


def forward_options(model: torch.nn.Module) -> dict:
    """``{"logits_to_keep": 1}`` when ``model``'s forward (through a PEFT wrapper) takes it, else ``{}``:
    a features-only pass needs hidden states, not the ``(B, T, V)`` vocabulary logits."""
    import inspect

    wrapper: Any = model  # maybe a PEFT model: nn.Module's typed attributes do not include get_base_model
    base = wrapper.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        accepted = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}


@torch.no_grad()
def prefix_features(
    model: torch.nn.Module,
    ids: list[list[int]],
    pad_token_id: int,
    batch_size: int = 8,
    layer: int = -1,
    pooling: str = "mean_last",
    progress: bool = False,
) -> torch.Tensor:
    """Verification-head features of N token sequences that each end at their ``p``, in eval mode.

    Batched by length (results in input order), right-padded with ``pad_token_id``; ``progress``: a tqdm bar.

    Returns:
        ``(N, 2H)`` float32 CPU tensor (``(N, H)`` for ``"last"`` / ``"mean"``).

    Raises:
        ValueError: no sequences, or an unknown ``pooling``.
    """
    verification_feature_pooling(pooling)  # validates it
    if not ids:
        raise ValueError("no sequences to embed")
    device = next(model.parameters()).device
    options = forward_options(model)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    was_training = model.training
    model.eval()
    chunks = []
    try:
        starts = range(0, len(order), max(1, batch_size))
        for start in tqdm(starts, desc="SDM head features", unit="batch", disable=not progress, leave=False):
            batch = [ids[i] for i in order[start : start + max(1, batch_size)]]
            width = max(len(x) for x in batch)
            input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, seq in enumerate(batch):  # building a padded batch, not per-point maths
                input_ids[row, : len(seq)] = torch.as_tensor(seq)
                mask[row, : len(seq)] = 1
            out = model(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), output_hidden_states=True, **options
            )
            chunks.append(pool_hidden_states(out.hidden_states[layer], mask.to(device), pooling).float().cpu())
    finally:
        model.train(was_training)
    feats = torch.cat(chunks)
    result = torch.empty_like(feats)
    result[torch.as_tensor(order)] = feats
    return result


def pool_verification_states(hidden: torch.Tensor, positions: torch.Tensor, pooling: str = "mean_last") -> torch.Tensor:
    """Verification-head features from the hidden states of whole documents, row ``i`` pooled over
    ``0..positions[i]`` only: equal to :func:`prefix_features` of the cut documents (a causal LM's state at
    ``t`` ignores later tokens), so the trainer reads them from the loss's forward.

    Args:
        hidden: ``(B, T, H)`` hidden states of a right-padded batch.
        positions: ``(B,)`` long, each row's ``p`` (``verified_position`` of :func:`encode_example`).

    Returns:
        ``(B, 2H)`` float32 on ``hidden``'s device (``(B, H)`` for ``"last"`` / ``"mean"``).

    Raises:
        ValueError: ``pooling`` unknown to :func:`~sdm_hf.features.pooling.pool_hidden_states`.
    """
    steps = torch.arange(hidden.shape[1], device=hidden.device).view(1, -1)
    return pool_hidden_states(hidden, (steps <= positions.to(hidden.device).view(-1, 1)).long(), pooling)
