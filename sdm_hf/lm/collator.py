"""``ContrastiveMaskingCollator``: pads encoded documents and carries the SDM metadata."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .encoding import IGNORE_INDEX

__all__ = ["ContrastiveMaskingCollator"]


@dataclass
class ContrastiveMaskingCollator:
    """Pad a list of :func:`~sdm_hf.lm.encoding.encode_example` rows into a batch.

    Right-pads ``input_ids`` with ``pad_token_id``, ``labels`` with -100 and builds the
    ``attention_mask``; carries ``reward`` ``[B]``, ``verified_position`` ``[B]`` (``p``, the
    last token of the final ``<verified>`` tag, where the verification head reads each
    document) and ``document_id`` ``[B]`` when the rows have them.

    Example:
        >>> c = ContrastiveMaskingCollator(pad_token_id=0)
        >>> b = c([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "reward": 1, "verified_position": 1},
        ...        {"input_ids": [8], "labels": [8], "reward": 0, "verified_position": 0}])
        >>> b["input_ids"].tolist(), b["labels"].tolist(), b["attention_mask"].tolist()
        ([[5, 6, 7], [8, 0, 0]], [[-100, 6, 7], [8, -100, -100]], [[1, 1, 1], [1, 0, 0]])
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("cannot collate an empty batch")
        width = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # building a padded batch
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.as_tensor(row["input_ids"])
            labels[i, :n] = torch.as_tensor(row["labels"])
            mask[i, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        for key in ("reward", "verified_position", "document_id"):
            if key in rows[0]:
                batch[key] = torch.tensor([int(r[key]) for r in rows], dtype=torch.long)
        return batch
