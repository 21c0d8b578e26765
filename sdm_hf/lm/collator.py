"""``ContrastiveMaskingCollator``: pads encoded documents and carries the SDM metadata."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from .masks import IGNORE_INDEX

__all__ = ["ContrastiveMaskingCollator"]


@dataclass
class ContrastiveMaskingCollator:
    """Right-pad :func:`~sdm_hf.lm.masks.encode_example` rows into ``(B, T)`` long ``input_ids`` (with
    ``pad_token_id``), ``labels`` (with -100) and ``attention_mask``, ``T`` rounded up to ``pad_to_multiple_of``;
    ``reward``, ``verified_position`` and ``document_id`` ``(B,)`` long when the rows have them. Raises
    ValueError for an empty batch or a row whose ``input_ids`` and ``labels`` differ in length.

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
        ids = [torch.as_tensor(r["input_ids"], dtype=torch.long) for r in rows]
        labels = [torch.as_tensor(r["labels"], dtype=torch.long) for r in rows]
        bad = next((i for i, (a, b) in enumerate(zip(ids, labels, strict=True)) if a.shape != b.shape), None)
        if bad is not None:
            raise ValueError(
                f"row {bad}: input_ids and labels must have the same length, got {len(ids[bad])} and {len(labels[bad])}"
            )
        input_ids = pad_sequence(ids, batch_first=True, padding_value=self.pad_token_id)
        batch_labels = pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX)
        lengths = torch.tensor([len(t) for t in ids])
        width = input_ids.shape[1]
        if self.pad_to_multiple_of:
            extra = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of - width
            input_ids = F.pad(input_ids, (0, extra), value=self.pad_token_id)
            batch_labels = F.pad(batch_labels, (0, extra), value=IGNORE_INDEX)
        mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": batch_labels}
        for key in ("reward", "verified_position", "document_id"):
            if key in rows[0]:
                batch[key] = torch.tensor([int(r[key]) for r in rows], dtype=torch.long)
        return batch
