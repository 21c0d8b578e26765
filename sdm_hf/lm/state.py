"""``SDMEpochState``: what :class:`~sdm_hf.lm.SDMTrainer` keeps between epochs (versions, hard-negative
caches, support rows), checkpointed as :data:`STATE_NAME` (strict JSON of format :data:`STATE_FORMAT` only,
no pickle) so that ``resume_from_checkpoint`` continues exactly; and :func:`refresh_summary`.

The file holds no training text, since checkpoints may be pushed: a document's own text is written as
``{"static": [document_id, k]}`` (``k`` = 0 the positive, ``k`` >= 1 static negative ``k - 1``) with a SHA-256
fingerprint of the documents; only hard negatives (the model's own generations) stay literal. The ``_``
prefix keeps the file out of the Trainer's ``output_dir`` pushes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

import torch

if TYPE_CHECKING:
    from .data import Document

__all__ = [
    "STATE_FORMAT",
    "STATE_NAME",
    "SDMEpochState",
    "documents_fingerprint",
    "refresh_summary",
]

STATE_NAME = "_sdm_trainer_state.json"
STATE_FORMAT = 2
_REQUIRED = {"format", "prepared_epoch", "versions", "hard_negatives", "previous_hard_negatives"}


@dataclass
class SDMEpochState:
    """The SDM training state of one epoch.

    Attributes:
        prepared_epoch: the epoch (0-based) whose versions were drawn, or None before any.
        versions: ``(document_id, text, reward)`` of every training document's version this
            epoch, in document order (``text`` ends with its control suffix; ``reward`` is True
            for the positive).
        hard_negatives: this epoch's wrong generations, per document id (suffix forced to No).
        previous_hard_negatives: the previous epoch's, which this epoch's head refresh may draw.
        support_row: ``[num_document_ids]`` long tensor, the verification head's support row of
            each document id in the head's own training half, -1 elsewhere (None: no head yet).
        pending_generation: with ``hard_negative_timing="in_epoch"``, the documents still to be
            generated for this epoch, each with its pre-drawn ``gamma_diversity`` decision.
    """

    prepared_epoch: int | None = None
    versions: list[tuple[int, str, bool]] = field(default_factory=list)
    hard_negatives: dict[int, list[str]] = field(default_factory=dict)
    previous_hard_negatives: dict[int, list[str]] = field(default_factory=dict)
    support_row: torch.Tensor | None = None
    pending_generation: dict[int, bool] = field(default_factory=dict)

    def to_json(self, documents: Sequence[Document] | None = None) -> str:
        """Strict JSON text (no ``NaN``/``Infinity``; document ids as string keys).

        Args:
            documents: the training documents: their texts are written as references and their fingerprint
                recorded (module docstring); None writes every text literally.
        """
        table = _static_texts(documents) if documents is not None else {}

        def ref(text: str) -> str | dict:
            return {"static": list(table[text])} if text in table else str(text)

        payload = {
            "format": STATE_FORMAT,
            "documents_sha256": None if documents is None else documents_fingerprint(documents),
            "prepared_epoch": self.prepared_epoch,
            "versions": [[int(i), ref(text), bool(reward)] for i, text, reward in self.versions],
            "hard_negatives": {str(k): [ref(t) for t in v] for k, v in self.hard_negatives.items()},
            "previous_hard_negatives": {str(k): [ref(t) for t in v] for k, v in self.previous_hard_negatives.items()},
            "support_row": None if self.support_row is None else [int(x) for x in self.support_row.tolist()],
            "pending_generation": [[int(k), bool(v)] for k, v in sorted(self.pending_generation.items())],
        }
        return json.dumps(payload, allow_nan=False)

    @classmethod
    def from_json(
        cls, text: str, source: str = "<string>", documents: Sequence[Document] | None = None
    ) -> SDMEpochState:
        """Parse and check :meth:`to_json` output.

        Args:
            source: the file name used in error messages.
            documents: the training documents its references resolve against (required when it has any).

        Raises:
            ValueError: naming ``source``: not JSON, another format, a field of the wrong shape, a reference
                outside ``documents`` (or none given), or a file written for other documents.
        """

        def fail(problem: str) -> NoReturn:
            raise ValueError(f"{source}: {problem}; it is not a valid SDM trainer state")

        def reject_constant(token: str) -> NoReturn:
            fail(f"non-standard JSON token {token}")

        try:
            data = json.loads(text, parse_constant=reject_constant)
        except json.JSONDecodeError as error:
            fail(f"not JSON ({error})")
        if not isinstance(data, dict):
            fail("the top level must be a JSON object")
        missing = sorted(_REQUIRED - set(data))
        if missing:
            fail(f"missing fields {missing}")
        version = data["format"]
        if not _is_int(version):
            fail(f"format must be an integer, got {version!r}")
        if version > STATE_FORMAT:
            fail(f"format {version} is newer than this sdm_hf reads ({STATE_FORMAT}); upgrade sdm_hf")
        if version != STATE_FORMAT:
            fail(f"format {version} was written by a pre-release sdm_hf; this sdm_hf reads format {STATE_FORMAT} only")
        fingerprint = data.get("documents_sha256")
        if fingerprint is not None and documents is not None and fingerprint != documents_fingerprint(documents):
            raise ValueError(
                f"{source} was written for other training documents (their fingerprint differs); resume with "
                "the train_dataset, control tokens and append_control the checkpoint was trained with"
            )
        epoch = data["prepared_epoch"]
        if epoch is not None and not (_is_int(epoch) and epoch >= 0):
            fail(f"prepared_epoch must be a non-negative integer or null, got {epoch!r}")
        versions = data["versions"]
        if not isinstance(versions, list) or not all(_is_version(v) for v in versions):
            fail("versions must be a list of [document_id, text, reward] with a non-negative integer id")
        pending = data.get("pending_generation", [])
        if not (
            isinstance(pending, list)
            and all(isinstance(p, list) and len(p) == 2 and _is_int(p[0]) and isinstance(p[1], bool) for p in pending)
        ):
            fail("pending_generation must be a list of [document_id, bool]")
        support = data.get("support_row")
        if support is not None and not (isinstance(support, list) and all(_is_int(x) and x >= -1 for x in support)):
            fail("support_row must be null or a list of integers >= -1")

        def resolve(value: str | dict) -> str:
            if isinstance(value, str):
                return value
            if documents is None:
                fail("it refers to the training documents by id; pass documents= to read it")
            doc_id, k = value["static"]
            if doc_id >= len(documents) or k > len(documents[doc_id].negatives):
                fail(
                    f"reference {value} is beyond the {len(documents)} training documents; resume with the "
                    "train_dataset the checkpoint was trained on"
                )
            doc = documents[doc_id]
            return doc.positive if k == 0 else doc.negatives[k - 1]

        def caches(name: str) -> dict[int, list[str]]:
            return {i: [resolve(t) for t in texts] for i, texts in _caches(data[name], name, fail).items()}

        return cls(
            prepared_epoch=epoch,
            versions=[(int(i), resolve(text), bool(reward)) for i, text, reward in versions],
            hard_negatives=caches("hard_negatives"),
            previous_hard_negatives=caches("previous_hard_negatives"),
            support_row=None if support is None else torch.tensor(support, dtype=torch.long),
            pending_generation={int(k): bool(v) for k, v in pending},
        )


def documents_fingerprint(documents: Sequence[Document]) -> str:
    """SHA-256 (hex) of the documents' prompts and texts, in order (identifies them without holding them)."""
    payload = [[d.prompt, d.positive, list(d.negatives)] for d in documents]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _static_texts(documents: Sequence[Document]) -> dict[str, tuple[int, int]]:
    """Every positive / static negative text -> ``(document_id, k)`` of its first occurrence."""
    table: dict[str, tuple[int, int]] = {}
    for doc_id, doc in enumerate(documents):
        for k, text in enumerate([doc.positive, *doc.negatives]):
            table.setdefault(text, (doc_id, k))
    return table


def _is_reference(value) -> bool:
    ref = value.get("static") if isinstance(value, dict) and len(value) == 1 else None
    return isinstance(ref, list) and len(ref) == 2 and all(_is_int(x) and x >= 0 for x in ref)


def _is_text(value) -> bool:
    return isinstance(value, str) or _is_reference(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_version(value) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 3
        and _is_int(value[0])
        and value[0] >= 0
        and _is_text(value[1])
        and isinstance(value[2], bool)
    )


def _caches(value, name: str, fail) -> dict[int, list]:
    """``{"<document id>": [text or reference, ...]}`` -> ``{id: [...]}``, checked."""
    if not isinstance(value, dict):
        fail(f"{name} must be an object")
    out = {}
    for key, texts in value.items():  # one entry per document with generations, not per data point
        if not (key.isdigit() and isinstance(texts, list) and all(_is_text(t) for t in texts)):
            fail(f"{name} must map document ids to lists of texts or references (bad entry {key!r})")
        out[int(key)] = texts
    return out


def refresh_summary(entry: dict) -> str:
    """One readable line for an epoch's refresh (an ``epoch_log`` entry)."""
    text = (
        f"SDM epoch {entry['epoch']}: {entry['generated']} generations, {entry['hard_negatives']} hard negatives "
        f"({entry['generation_seconds']:.1f} s)"
    )
    if "head_hr_admission" in entry:
        if entry.get("head_hr_empty"):
            region = "HR region empty"
        else:
            admitted = f"{entry['head_hr_admission']:.1%}"
            region = f"HR region from q' >= {entry['head_q_min']:.3g}, {admitted} of calibration admitted"
        text += f"; verification head: {region} ({entry['head_features_seconds'] + entry['head_fit_seconds']:.1f} s)"
    return text
