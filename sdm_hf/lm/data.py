"""Preference data -> documents (a prompt, its positive completion and static negatives; Schmaltz 2025,
*Similarity-Distance-Magnitude Language Models*, arXiv:2510.26183, Sec. 2) from TRL's formats:

* paired ``{"prompt", "chosen", "rejected"}``: one document per row;
* unpaired ``{"prompt", "completion", "label"}``: one document per positive row, with its prompt's
  negative rows as static negatives; prompts without a positive are returned aside.

Prompts and completions may be text or chat messages (lists of ``{"role", "content"}``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch.utils.data import Dataset

from .control import ControlTokens, Prompt
from .masks import encode_example

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

__all__ = ["Document", "VersionDataset", "prepare_documents", "encode_documents", "negative_only_documents"]


@dataclass
class Document:
    """One prompt with its positive completion and static negatives (suffixes included)."""

    id: int
    prompt: Prompt
    positive: str
    negatives: list[str] = field(default_factory=list)


def _content(value, column: str, row: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and "content" in value[-1]:
        return str(value[-1]["content"])
    raise ValueError(f"row {row}: column {column!r} must be a string or a list of messages")


def _prompt(value, row: int) -> Prompt:
    if isinstance(value, str):
        return value
    if (
        isinstance(value, list)
        and value
        and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value)
    ):
        return value
    raise ValueError(
        f"row {row}: column 'prompt' must be a string or a non-empty list of messages "
        f"({{'role': ..., 'content': str}}), got {type(value).__name__}"
    )


def _holds_prompt(row: Mapping[str, Any]) -> bool:
    """Whether a paired row's prompt is inside ``chosen`` (no prompt column, or chosen starts before the assistant)."""
    chosen = row.get("chosen")
    if "prompt" not in row:
        return True
    if not (isinstance(chosen, list) and chosen and isinstance(chosen[0], dict)):
        return False
    return chosen[0].get("role") != "assistant"


def _prompt_extractor(required: bool) -> Callable[[dict], dict] | None:
    """TRL's ``maybe_extract_prompt``, or None without TRL (ValueError instead when ``required``)."""
    try:
        from trl.data_utils import maybe_extract_prompt
    except ImportError:
        if required:
            raise ValueError(
                "rows without a prompt column (TRL's implicit-prompt format: the prompt inside chosen and "
                "rejected) need TRL to split the prompt off: pip install trl (or sdm-hf[lm])"
            ) from None
        return None
    return maybe_extract_prompt


def _with_suffix(text: str, verified: bool, control: ControlTokens, append: bool, row: int) -> str:
    if control.decision(text) == verified:
        return text
    if control.decision(text) is not None:
        raise ValueError(f"row {row}: a {'positive' if verified else 'negative'} ends with the opposite control suffix")
    if not append:
        raise ValueError(
            f"row {row}: completion lacks its control suffix {control.suffix(verified)!r}; "
            "pass append_control=True to add it"
        )
    return control.add(text, verified)


def prepare_documents(
    dataset: datasets.Dataset | Sequence[Mapping[str, Any]],
    control: ControlTokens | None = None,
    append_control: bool = True,
) -> tuple[list[Document], list[dict]]:
    """Documents from a TRL preference dataset (paired, unpaired, or paired with the prompt implicit in
    ``chosen`` / ``rejected``, split off by TRL's ``maybe_extract_prompt``).

    Args:
        append_control: add a missing control suffix (False: a missing one raises).

    Returns:
        ``(documents, negative_only)``: the trainable documents, and the unpaired prompts that had only
        negatives as ``{"prompt", "pos", "neg"}`` dicts (verification-head data only; a UserWarning counts them).

    Raises:
        ValueError: neither format's columns, a malformed prompt / completion / label, a completion ending
            with the opposite suffix or (``append_control=False``) none, or an implicit prompt without TRL.
    """
    control = control or ControlTokens()
    columns = set(getattr(dataset, "column_names", None) or (dataset[0].keys() if len(dataset) else []))
    implicit = {"chosen", "rejected"} <= columns and "prompt" not in columns  # TRL's implicit prompt
    paired = {"prompt", "chosen", "rejected"} <= columns or implicit
    unpaired = {"prompt", "completion", "label"} <= columns
    if not (paired or unpaired):
        missing = sorted({"prompt", "chosen", "rejected"} - columns)
        raise ValueError(
            f"the dataset needs columns prompt/chosen/rejected (paired; or chosen/rejected holding the prompt, "
            f"TRL's implicit prompt) or prompt/completion/label (unpaired); it has {sorted(columns)} "
            f"(missing for the paired format: {missing})"
        )
    documents: list[Document] = []
    if paired:
        extract = _prompt_extractor(required=implicit)
        for i, row in enumerate(dataset):
            if extract is not None and _holds_prompt(row):  # the shared prompt split off chosen/rejected
                row = extract(dict(row))
            documents.append(
                Document(
                    id=len(documents),
                    prompt=_prompt(row["prompt"], i),
                    positive=_with_suffix(_content(row["chosen"], "chosen", i), True, control, append_control, i),
                    negatives=[
                        _with_suffix(_content(row["rejected"], "rejected", i), False, control, append_control, i)
                    ],
                )
            )
        return documents, []
    groups: dict[str, dict] = {}
    for i, row in enumerate(dataset):
        prompt = _prompt(row["prompt"], i)
        key = json.dumps(prompt, sort_keys=True)
        group = groups.setdefault(key, {"prompt": prompt, "pos": [], "neg": []})
        if not isinstance(row["label"], (bool, int)) or row["label"] not in (0, 1):
            raise ValueError(f"row {i}: column 'label' must be a bool (or 0/1), got {row['label']!r}")
        verified = bool(row["label"])
        text = _with_suffix(_content(row["completion"], "completion", i), verified, control, append_control, i)
        group["pos" if verified else "neg"].append(text)
    negative_only = []
    for group in groups.values():
        if not group["pos"]:
            negative_only.append(group)
            continue
        for positive in group["pos"]:
            documents.append(Document(len(documents), group["prompt"], positive, list(group["neg"])))
    if negative_only:
        warnings.warn(
            f"{len(negative_only)} prompt(s) have no positive completion: the LM is not trained on them "
            "(SDMTrainer gives their negatives to the verification head only)",
            UserWarning,
            stacklevel=2,
        )
    return documents, negative_only


def _encode_row(row: dict, tokenizer, control: ControlTokens, max_length: int | None) -> dict:
    try:
        return encode_example(
            tokenizer, json.loads(row["prompt"]), row["text"], row["reward"] == 1, control, max_length=max_length
        )
    except ValueError as error:
        raise ValueError(f"document {row['document_id']}: {error}") from error


def negative_only_documents(groups: Sequence[Mapping[str, Any]], first_id: int) -> list[Document]:
    """:func:`prepare_documents`' ``negative_only`` prompts as documents with an empty ``positive`` and ids
    from ``first_id`` on (verification-head data; the LM never trains on them)."""
    return [Document(first_id + j, g["prompt"], "", list(g["neg"])) for j, g in enumerate(groups)]


def encode_documents(
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[Document],
    control: ControlTokens | None = None,
    max_length: int | None = None,
    num_proc: int | None = None,
) -> dict[tuple[int, str], dict]:
    """Tokenize every static version (positive, static negatives) of ``documents`` once with
    :func:`~sdm_hf.lm.masks.encode_example`, through ``datasets.Dataset.map`` (``num_proc`` workers).

    Returns:
        ``{(document id, text): row}``, ``encode_example``'s rows plus ``document_id`` and ``text``.

    Raises:
        ValueError: a version cannot be encoded (the message names the document).
    """
    import datasets

    control = control or ControlTokens()
    versions = [
        (d, text, positive)
        for d in documents
        for text, positive in [(d.positive, True)] * bool(d.positive) + [(n, False) for n in d.negatives]
    ]
    if not versions:
        return {}
    table = datasets.Dataset.from_dict(
        {
            "document_id": [d.id for d, _, _ in versions],
            "prompt": [json.dumps(d.prompt) for d, _, _ in versions],
            "text": [t for _, t, _ in versions],
            "reward": [int(p) for _, _, p in versions],
        }
    )
    encoded = table.map(
        _encode_row,
        fn_kwargs={"tokenizer": tokenizer, "control": control, "max_length": max_length},
        remove_columns=["prompt", "reward"],
        num_proc=num_proc if num_proc and num_proc > 1 and len(versions) > 1 else None,
        desc="Encoding SDM documents",
    )
    return {(row["document_id"], row["text"]): row for row in encoded}


class VersionDataset(Dataset):
    """The encoded version of each document this epoch; ``rows`` are replaced in place at every epoch
    start, so the Trainer's loader never changes."""

    def __init__(self):
        self.rows: list[dict] = []

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]
