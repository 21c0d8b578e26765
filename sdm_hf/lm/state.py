"""``SDMEpochState``: what :class:`~sdm_hf.lm.SDMTrainer` must keep between epochs.

The model weights, optimizer and scheduler are checkpointed by ``transformers.Trainer``; the
SDM side of training adds the epoch's document versions, the online hard-negative caches and
the map from document ids to the verification head's support rows. A checkpoint stores them
as ``sdm_trainer_state.json`` (strict JSON, a format version, no pickle) so that
``resume_from_checkpoint`` continues exactly where the run stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

__all__ = ["STATE_FORMAT", "STATE_NAME", "SDMEpochState"]

STATE_NAME = "sdm_trainer_state.json"
STATE_FORMAT = 1
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
    """

    prepared_epoch: int | None = None
    versions: list[tuple[int, str, bool]] = field(default_factory=list)
    hard_negatives: dict[int, list[str]] = field(default_factory=dict)
    previous_hard_negatives: dict[int, list[str]] = field(default_factory=dict)
    support_row: torch.Tensor | None = None

    def to_json(self) -> str:
        """Strict JSON text (no ``NaN``/``Infinity`` tokens; document ids as string keys)."""
        payload = {
            "format": STATE_FORMAT,
            "prepared_epoch": self.prepared_epoch,
            "versions": [[int(i), str(text), bool(reward)] for i, text, reward in self.versions],
            "hard_negatives": {str(k): list(v) for k, v in self.hard_negatives.items()},
            "previous_hard_negatives": {str(k): list(v) for k, v in self.previous_hard_negatives.items()},
            "support_row": None if self.support_row is None else [int(x) for x in self.support_row.tolist()],
        }
        return json.dumps(payload, allow_nan=False)

    @classmethod
    def from_json(cls, text: str, source: str = "<string>") -> SDMEpochState:
        """Parse and check :meth:`to_json` output.

        Args:
            source: the file name used in error messages.

        Raises:
            ValueError: naming ``source`` and the problem, when the text is not JSON, was
                written by a newer format, or a field has the wrong shape.
        """

        def fail(problem: str):
            raise ValueError(f"{source}: {problem}; it is not a valid SDM trainer state")

        def reject_constant(token: str):
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
        if version < 1:
            fail(f"unknown format {version}")
        epoch = data["prepared_epoch"]
        if epoch is not None and not (_is_int(epoch) and epoch >= 0):
            fail(f"prepared_epoch must be a non-negative integer or null, got {epoch!r}")
        versions = data["versions"]
        if not isinstance(versions, list) or not all(_is_version(v) for v in versions):
            fail("versions must be a list of [document_id, text, reward] with a non-negative integer id")
        support = data.get("support_row")
        if support is not None and not (isinstance(support, list) and all(_is_int(x) and x >= -1 for x in support)):
            fail("support_row must be null or a list of integers >= -1")
        return cls(
            prepared_epoch=epoch,
            versions=[(int(i), text, bool(reward)) for i, text, reward in versions],
            hard_negatives=_caches(data["hard_negatives"], "hard_negatives", fail),
            previous_hard_negatives=_caches(data["previous_hard_negatives"], "previous_hard_negatives", fail),
            support_row=None if support is None else torch.tensor(support, dtype=torch.long),
        )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_version(value) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 3
        and _is_int(value[0])
        and value[0] >= 0
        and isinstance(value[1], str)
        and isinstance(value[2], bool)
    )


def _caches(value, name: str, fail) -> dict[int, list[str]]:
    """``{"<document id>": [text, ...]}`` -> ``{id: [text, ...]}``, checked."""
    if not isinstance(value, dict):
        fail(f"{name} must be an object")
    out = {}
    for key, texts in value.items():  # one entry per document with generations, not per data point
        if not (key.isdigit() and isinstance(texts, list) and all(isinstance(t, str) for t in texts)):
            fail(f"{name} must map document ids to lists of strings (bad entry {key!r})")
        out[int(key)] = texts
    return out
