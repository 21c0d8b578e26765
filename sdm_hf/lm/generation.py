"""Batched generation for SDM language models: greedy (hard negatives, evaluation) and sampled."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from .control import Prompt, generation_prompt

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["generate_greedy", "generate_sampled"]


@torch.no_grad()
def generate_greedy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    batch_size: int = 8,
    progress: bool = False,
    **generate_kwargs: Any,
) -> list[str]:
    """Greedy, batched, left-padded generation with the KV cache, in eval mode.

    Args:
        prompts: strings or chat-message lists (formatted with :func:`generation_prompt`).
        progress: a tqdm bar over the batches.
        generate_kwargs: passed to ``model.generate``.

    Returns:
        The decoded new text of each prompt (special tokens skipped), in order.
    """
    greedy = {"do_sample": False}
    return _generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress, greedy, generate_kwargs)


def generate_sampled(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    batch_size: int = 8,
    seed: int = 0,
    **sampling: Any,
) -> list[str]:
    """:func:`generate_greedy` with ``do_sample=True`` and ``generate``'s ``sampling`` options (e.g.
    ``temperature``, ``top_p``), reproducible: the global generator is seeded with ``seed`` first."""
    torch.manual_seed(int(seed))
    return _generate(model, tokenizer, prompts, max_new_tokens, batch_size, False, {"do_sample": True}, sampling)


def _generate(  # the loop of generate_greedy / generate_sampled: batched, left-padded, KV cache
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    batch_size: int,
    progress: bool,
    decoding: dict[str, Any],
    generate_kwargs: dict[str, Any],
) -> list[str]:
    was_training = model.training
    model.eval()
    generator: Any = model  # a causal LM (maybe PEFT-wrapped): nn.Module's typed attributes lack generate/device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # decoder-only batching
    completions = []
    try:
        starts = range(0, len(prompts), max(1, batch_size))
        for start in tqdm(starts, desc="generating", unit="batch", disable=not progress, leave=False):
            texts = [generation_prompt(tokenizer, p) for p in prompts[start : start + max(1, batch_size)]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(generator.device)
            out = generator.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                use_cache=True,
                **decoding,
                pad_token_id=tokenizer.pad_token_id,
                **generate_kwargs,
            )
            completions.extend(tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return completions
