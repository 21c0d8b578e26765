"""Control strings and the document text of SDM language models (Schmaltz 2025,
*Similarity-Distance-Magnitude Language Models*, arXiv:2510.26183, Sec. 3.1-3.2).

A completion ends with ``<verified>Yes</verified>`` (positive) or ``<verified>No</verified>``
(negative); the verification head reads a document up to ``p``, the last token of its FINAL
``<verified>`` opening tag.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias, cast

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "Prompt",
    "ControlTokens",
    "check_messages",
    "as_messages",
    "format_document",
    "generation_prompt",
    "full_text",
    "verification_positions",
]


#: A prompt: a string, or a conversation (a list of ``{"role", "content"}`` messages).
Prompt: TypeAlias = str | Sequence[dict[str, Any]]


@dataclass(frozen=True)
class ControlTokens:
    """The control strings: ``open + yes + close`` marks a positive, ``open + no + close`` a negative."""

    open: str = "<verified>"
    yes: str = "Yes"
    no: str = "No"
    close: str = "</verified>"

    def suffix(self, verified: bool) -> str:
        """``open + (yes if verified else no) + close``."""
        return f"{self.open}{self.yes if verified else self.no}{self.close}"

    def remove_suffix(self, completion: str) -> str:
        """``completion`` right-stripped, without a trailing (possibly truncated) control suffix and the
        whitespace before it."""
        text = completion.rstrip()
        cut = text.rfind(self.open)
        if cut >= 0 and any((self.open + answer + self.close).startswith(text[cut:]) for answer in (self.yes, self.no)):
            return text[:cut].rstrip()
        return text

    def add(self, completion: str, verified: bool) -> str:
        """``completion`` (any existing suffix replaced) followed by the suffix for ``verified``."""
        return self.remove_suffix(completion) + self.suffix(verified)

    def decision(self, completion: str) -> bool | None:
        """What the completion's trailing suffix says (True/False), or None if it has none."""
        text = completion.rstrip()
        for verified in (True, False):
            if text.endswith(self.suffix(verified)):
                return verified
        return None


def check_messages(messages: Any, name: str = "prompt") -> list[dict[str, Any]]:
    """``messages`` as a list, checked to be non-empty ``{"role": str, "content": str}`` dicts (a chat
    template would render a missing field as an empty turn). Raises TypeError / ValueError naming ``name``."""
    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, Sequence):
        raise TypeError(f"{name} must be a string or a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ValueError(f"{name} is an empty list of messages")
    for k, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TypeError(f"{name}[{k}] must be a dict {{'role': ..., 'content': ...}}, got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                found = "missing" if key not in message else f"a {type(message[key]).__name__}"
                raise ValueError(f"{name}[{k}] needs a string {key!r} (it is {found})")
    return list(messages)


def as_messages(prompt: Prompt, name: str = "prompt") -> list[dict[str, Any]]:
    """A prompt as chat messages: a string becomes one user turn; a list is checked (:func:`check_messages`)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return check_messages(prompt, name)


def format_document(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, completion: str) -> str:
    """The text the model sees: the chat template with ``completion`` as the assistant turn, else
    ``prompt + completion``. Raises TypeError for a conversational prompt without a chat template."""
    if getattr(tokenizer, "chat_template", None):
        messages = as_messages(prompt) + [{"role": "assistant", "content": completion}]
        return cast(str, tokenizer.apply_chat_template(messages, tokenize=False))  # a str with tokenize=False
    if not isinstance(prompt, str):
        raise TypeError("conversational prompts need a tokenizer with a chat template")
    return prompt + completion


def generation_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> str:
    """The formatted text that precedes the completion. Raises TypeError as :func:`format_document`."""
    if getattr(tokenizer, "chat_template", None):
        messages = as_messages(prompt)
        return cast(str, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    if not isinstance(prompt, str):
        raise TypeError("conversational prompts need a tokenizer with a chat template")
    return prompt


def full_text(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, completion: str) -> tuple[str, int]:
    """``(text, completion_start)``: the formatted document and the character index where its completion
    starts; without a chat template the EOS text is appended (so the document's end is trained).

    Raises:
        ValueError: the chat template renders the prompt differently with the assistant turn.
        TypeError: a conversational prompt without a chat template.
    """
    prefix = generation_prompt(tokenizer, prompt)
    if getattr(tokenizer, "chat_template", None):
        text = format_document(tokenizer, prompt, completion)
        if not text.startswith(prefix):
            raise ValueError(
                "the chat template renders the prompt differently with and without the assistant turn; "
                "cannot locate where the completion starts"
            )
    else:
        text = prefix + completion + (tokenizer.eos_token or "")
    return text, len(prefix)


def verification_positions(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], control: ControlTokens, max_length: int | None = None
) -> tuple[list[list[int]], list[int]]:
    """Tokenize ``texts`` (no padding, no special tokens) and find ``p``, the last token overlapping
    the final ``control.open`` tag, located by character offsets.

    Returns:
        ``(ids, positions)``: each text's token ids cut after its ``p``, and the ``p``s.

    Raises:
        ValueError: a text has no opening tag, the tag maps to no token, or it lies beyond
            ``max_length`` tokens.
    """
    enc = tokenizer(texts, return_offsets_mapping=True, add_special_tokens=False, truncation=False)
    ids_out, positions = [], []
    for i, (text, ids, offsets) in enumerate(zip(texts, enc["input_ids"], enc["offset_mapping"])):
        start = text.rfind(control.open)
        if start < 0:
            raise ValueError(f"document {i} has no {control.open!r} tag to verify at")
        end = start + len(control.open)
        p = max((j for j, (a, b) in enumerate(offsets) if a < end and b > a), default=-1)
        if p < 0:
            raise ValueError(f"document {i}: the {control.open!r} tag maps to no token")
        if max_length is not None and p >= max_length:
            raise ValueError(f"document {i}: its {control.open!r} tag lies beyond max_length={max_length} tokens")
        ids_out.append(ids[: p + 1])
        positions.append(p)
    return ids_out, positions
