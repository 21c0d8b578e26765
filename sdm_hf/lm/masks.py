"""Contrastive masking: a document's token ids and the labels its loss trains (Schmaltz 2025,
*Similarity-Distance-Magnitude Language Models*, arXiv:2510.26183, Sec. 3.1).

A positive trains its whole completion; a negative trains only its final control string.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .control import ControlTokens, Prompt, full_text, verification_positions

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["IGNORE_INDEX", "encode_example"]

IGNORE_INDEX = -100


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Prompt,
    completion: str,
    positive: bool,
    control: ControlTokens | None = None,
    max_length: int | None = None,
) -> dict:
    """Tokenize one document and build its contrastive loss mask (Schmaltz 2025, *Similarity-Distance-Magnitude
    Language Models*, arXiv:2510.26183, Sec. 3.1).

    Labels are -100 before the completion; a positive trains its whole completion (and the end-of-turn/EOS
    text after it), a negative only the tokens whose character offset starts at or after its final
    ``<verified>No</verified>``.

    Args:
        completion: ends with its control suffix (:meth:`ControlTokens.add`).
        positive: True for a positive (reward 1), False for a negative.

    Returns:
        ``{"input_ids": list[int], "labels": list[int], "verified_position": p, "reward": 0 | 1}``, with ``p``
        the last token of the final ``control.open`` tag.

    Raises:
        ValueError: the completion lacks its control suffix, the control string cannot be located after
            tokenization, or ``max_length`` cuts it off.
    """
    control = control or ControlTokens()
    expected = control.suffix(positive)
    if not completion.rstrip().endswith(expected):
        raise ValueError(f"the completion must end with {expected!r} (use ControlTokens.add)")
    text, start = full_text(tokenizer, prompt, completion)
    if positive:
        boundary = start
    else:
        boundary = text.rfind(expected)
        if boundary < start:
            raise ValueError("the negative's control string was not found inside its completion")
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [tok if (a >= boundary and b > a) else IGNORE_INDEX for tok, (a, b) in zip(ids, offsets)]
    _, positions = verification_positions(tokenizer, [text], control)
    p = positions[0]
    if not any(label != IGNORE_INDEX for label in labels):
        raise ValueError("no token of the completion's control string could be located after tokenization")
    if max_length is not None and len(ids) > max_length:
        if p >= max_length or not any(label != IGNORE_INDEX for label in labels[:max_length]):
            raise ValueError(f"max_length={max_length} cuts the document before its control tokens")
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": list(ids), "labels": labels, "verified_position": p, "reward": int(positive)}
