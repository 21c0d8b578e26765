"""Control tokens, contrastive masking and verification features for SDM language models.

Every completion ends with a control suffix: ``<verified>Yes</verified>`` for a positive,
``<verified>No</verified>`` for a negative (the strings are configurable and are added to
the text, not necessarily as new vocabulary). The loss mask of a negative trains only its
final control string ("contrastive masking"; Schmaltz 2025, *Similarity-Distance-Magnitude
Language Models*, arXiv:2510.26183, Sec. 3.1). The verification head reads a document up to
``p``, the last token of the FINAL ``<verified>`` opening tag in the tokenized,
chat-formatted sequence (ibid., Sec. 3.2); ``p`` is located from tokenizer offsets, so a
control string that also appears inside the prompt is never mistaken for the final one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import torch
from tqdm.auto import tqdm

from ..features.pooling import pool_hidden_states
from ..head.config import is_verification_pooling

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "ControlTokens",
    "Prompt",
    "IGNORE_INDEX",
    "format_document",
    "full_text",
    "encode_example",
    "generation_prompt",
    "generate_greedy",
    "generate_sampled",
    "verification_positions",
    "verification_features",
    "prefix_features",
    "forward_options",
    "pool_verification_states",
    "VERIFICATION_POOLINGS",
    "verification_feature_pooling",
    "verification_pooling_of",
    "is_verification_pooling",
]


#: A prompt: a string, or a conversation (a list of ``{"role", "content"}`` messages).
Prompt: TypeAlias = str | Sequence[dict[str, Any]]


@dataclass(frozen=True)
class ControlTokens:
    """The control strings: ``open + yes + close`` marks a positive, ``open + no + close`` a
    negative."""

    open: str = "<verified>"
    yes: str = "Yes"
    no: str = "No"
    close: str = "</verified>"

    def suffix(self, verified: bool) -> str:
        return f"{self.open}{self.yes if verified else self.no}{self.close}"

    def remove_suffix(self, completion: str) -> str:
        """The completion without a trailing control suffix (and the whitespace before it).

        Anything from the final opening tag on is removed when it is a (possibly truncated)
        control suffix; other text is returned unchanged."""
        text = completion.rstrip()
        cut = text.rfind(self.open)
        if cut >= 0 and any((self.open + answer + self.close).startswith(text[cut:]) for answer in (self.yes, self.no)):
            return text[:cut].rstrip()
        return text

    def add(self, completion: str, verified: bool) -> str:
        """``completion`` (any existing suffix replaced) followed by the suffix for ``verified``."""
        return self.remove_suffix(completion) + self.suffix(verified)

    def decision(self, completion: str) -> bool | None:
        """What the completion's own trailing suffix says (True/False), or None if it has none."""
        text = completion.rstrip()
        for verified in (True, False):
            if text.endswith(self.suffix(verified)):
                return verified
        return None


def check_messages(messages: Any, name: str = "prompt") -> list[dict[str, Any]]:
    """``messages`` as a list after checking it is a non-empty list of ``{"role": str,
    "content": str}`` dicts (a chat template would otherwise render a missing field as an
    empty turn). Raises TypeError / ValueError naming ``name`` and the message."""
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
    """A prompt as chat messages: a string becomes one user turn; a list is checked with
    :func:`check_messages`."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return check_messages(prompt, name)


def format_document(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, completion: str) -> str:
    """The text the model sees for ``(prompt, completion)``.

    With a chat template the prompt (a string, or a list of messages) becomes the user
    turn(s) and the completion the assistant turn; without one, prompt and completion are
    concatenated.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = as_messages(prompt) + [{"role": "assistant", "content": completion}]
        return cast(str, tokenizer.apply_chat_template(messages, tokenize=False))  # a str with tokenize=False
    if not isinstance(prompt, str):
        raise TypeError("conversational prompts need a tokenizer with a chat template")
    return prompt + completion


def verification_positions(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], control: ControlTokens, max_length: int | None = None
) -> tuple[list[list[int]], list[int]]:
    """Tokenize ``texts`` (no padding) and find ``p`` in each: the last token overlapping the
    final ``control.open`` tag.

    Returns:
        ``(input_ids list, p list)``.

    Raises:
        ValueError: a text has no opening tag, or it lies beyond ``max_length`` tokens.
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


VERIFICATION_POOLINGS = ("mean_last", "last", "mean")


def verification_feature_pooling(pooling: str) -> str:
    """The ``SDMConfig.feature_pooling`` a verification head records for ``pooling``:
    ``"verification"`` for the paper's ``"mean_last"``, ``"verification-last"`` or
    ``"verification-mean"`` otherwise.

    Example:
        >>> verification_feature_pooling("mean_last"), verification_feature_pooling("last")
        ('verification', 'verification-last')
    """
    if pooling not in VERIFICATION_POOLINGS:
        raise ValueError(f"verification pooling must be one of {VERIFICATION_POOLINGS}, got {pooling!r}")
    return "verification" if pooling == "mean_last" else f"verification-{pooling}"


def verification_pooling_of(feature_pooling: str | None) -> str:
    """The pooling (``"mean_last"``, ``"last"`` or ``"mean"``) of a verification head's
    recorded ``feature_pooling`` (the inverse of :func:`verification_feature_pooling`)."""
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
    """Verification-head features of ``(prompt, completion)`` pairs.

    Each completion's control suffix is replaced by a neutral one (nothing after the opening
    tag is read), the pair is chat-formatted, and the hidden states of ``layer`` (default the
    final one) are pooled over positions ``0..p`` (``p``: the last token of the final
    ``<verified>`` opening tag) as ``concat(mean over 0..p, state at p)`` (``"mean_last"``,
    the input of the document-level SDM layer in Schmaltz 2025, *Similarity-Distance-Magnitude
    Language Models*, arXiv:2510.26183, Sec. 3.2), or only the state at ``p`` (``"last"``) or
    only the mean (``"mean"``). Computed in eval mode (no dropout).

    Returns:
        ``[N, 2H]`` (``"mean_last"``) or ``[N, H]`` float32 CPU tensor.
    """
    control = control or ControlTokens()
    texts = [format_document(tokenizer, p, control.add(c, True)) for p, c in zip(prompts, completions)]
    if not texts:
        raise ValueError("no documents to verify")
    ids, _ = verification_positions(tokenizer, texts, control)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return prefix_features(model, ids, pad, batch_size=batch_size, layer=layer, pooling=pooling)


def forward_options(model: torch.nn.Module) -> dict:
    """Extra forward arguments for a features-only pass: ``{"logits_to_keep": 1}`` when the
    model's forward takes it (transformers >= 4.50 causal LMs; through a PEFT wrapper too),
    else ``{}``. The features need hidden states, not the ``[B, T, vocab]`` logits, which for
    a large vocabulary are a sizeable part of a forward."""
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
    """Verification-head features of token sequences already cut after ``p`` (each ends at
    its ``p``): ``concat(mean of hidden[0..p], hidden[p])`` of the final layer (or ``layer``),
    in eval mode; ``pooling="last"`` / ``"mean"`` keep one of the two halves; ``progress``:
    a tqdm bar over the batches.

    Sequences are batched in order of length (less padding; results are returned in the
    input order), right-padded, and the vocabulary projection is skipped where possible.

    Returns:
        ``[N, 2H]`` (``[N, H]`` for ``"last"`` / ``"mean"``) float32 CPU tensor.
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
    """Verification-head features from the hidden states of whole (uncut) documents.

    Row ``i`` is pooled over its positions ``0..positions[i]`` only:
    ``concat(mean of hidden[i, 0..p], hidden[i, p])`` with ``p = positions[i]``. Because a
    causal LM's state at ``t`` does not depend on later tokens, this equals
    :func:`prefix_features` of the document cut after ``p``; it lets the trainer read the
    features from the forward that computes the loss.

    Args:
        hidden: ``[B, T, H]`` hidden states (right-padded batch).
        positions: ``[B]`` each row's ``p`` (``verified_position`` of :func:`encode_example`).

    Returns:
        ``[B, 2H]`` (``[B, H]`` for ``pooling="last"`` / ``"mean"``) float32 on ``hidden``'s device.
    """
    steps = torch.arange(hidden.shape[1], device=hidden.device).view(1, -1)
    return pool_hidden_states(hidden, (steps <= positions.to(hidden.device).view(-1, 1)).long(), pooling)


IGNORE_INDEX = -100


def generation_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> str:
    """The formatted text that precedes the completion (the generation prompt)."""
    if getattr(tokenizer, "chat_template", None):
        messages = as_messages(prompt)
        return cast(str, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    if not isinstance(prompt, str):
        raise TypeError("conversational prompts need a tokenizer with a chat template")
    return prompt


def full_text(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, completion: str) -> tuple[str, int]:
    """``(text, completion_start)``: the formatted document and where its completion starts.

    Without a chat template the tokenizer's EOS text is appended (so that, as with a chat
    template's end-of-turn tokens, the end of the document is trained)."""
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


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Prompt,
    completion: str,
    positive: bool,
    control: ControlTokens | None = None,
    max_length: int | None = None,
) -> dict:
    """Tokenize one document and build its contrastive loss mask (Schmaltz 2025, SDM
    language models, Sec. 3.1).

    Prompt and template positions before the completion get label -100. A positive trains
    every completion token (and the end-of-turn/EOS text after it); a negative trains only
    the tokens from its final control string (``<verified>No</verified>``) onward; a token
    straddling that boundary is trained iff its character offset starts at or after it.

    Args:
        completion: must already end with its control suffix.
        positive: True for a positive (reward 1), False for a negative.

    Returns:
        ``{"input_ids", "labels", "verified_position", "reward"}`` (lists / ints), where
        ``verified_position`` is ``p``, the last token of the final ``control.open`` tag
        (where the verification head reads the document).

    Raises:
        ValueError: the completion lacks its control suffix, the control string cannot be
            located after tokenization, or ``max_length`` cuts it off.
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

    Returns:
        The decoded new text of each prompt (special tokens skipped).
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
    """Like :func:`generate_greedy` but sampling (``do_sample=True``; ``sampling`` are
    ``generate``'s sampling options, e.g. ``temperature``, ``top_p``), seeded with
    ``torch.manual_seed(seed)`` first (the global generator), so a call is reproducible."""
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
