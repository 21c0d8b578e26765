"""Class labels as names or indices: one rule for ``fit_sdm_head``, :class:`~sdm_hf.SDMClassifier` and the CLI.

Indices ``0..C-1`` pass through; names map to indices by a given ``id2label``, else by the sorted names seen
(``["neg", "pos"]`` -> ``{0: "neg", 1: "pos"}``), and the mapping is kept in ``SDMConfig.id2label``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["is_named", "encode_labels", "names_to_ids"]


def is_named(y: Any) -> bool:
    """True when ``y`` holds label names (strings) rather than class indices."""
    if isinstance(y, torch.Tensor):
        return False
    if isinstance(y, np.ndarray):
        return y.dtype.kind in "USO" and y.size > 0 and isinstance(y.flat[0], str)
    if isinstance(y, Sequence) and not isinstance(y, (str, bytes)):
        return len(y) > 0 and isinstance(y[0], str)
    return False


def names_to_ids(y: Any, name: str, label2id: dict[str, int]) -> torch.Tensor:
    """``(N,)`` int64 class indices of the label names ``y`` (``name``: the argument's name for messages).

    Raises:
        TypeError: ``y`` mixes names with other values.
        ValueError: a name is not in ``label2id`` (the message lists the known names).
    """
    values = list(y.tolist() if isinstance(y, np.ndarray) else y)
    bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
    if bad is not None:
        raise TypeError(
            f"{name} mixes label names with other values ({values[bad]!r} at position {bad}); "
            "give every label as a name or every label as a class index"
        )
    unknown = sorted(set(values) - set(label2id))
    if unknown:
        raise ValueError(f"{name} has label names {unknown[:5]} that are not among the classes {sorted(label2id)}")
    return torch.tensor([label2id[v] for v in values], dtype=torch.long)


def encode_labels(
    train_y: Any, calib_y: Any, id2label: dict[int, str] | None = None
) -> tuple[Any, Any, dict[int, str] | None]:
    """Map label names to class indices; indices pass through unchanged.

    Args:
        train_y, calib_y: ``(N,)`` labels, names (str) or class indices.
        id2label: the class names by index, when known; otherwise the sorted names seen.

    Returns:
        ``(train_y, calib_y, id2label)``: int64 tensors and the mapping used for names; for indices the
        inputs and ``id2label`` unchanged.

    Raises:
        TypeError: one argument holds names and the other indices, or names mixed with other values.
        ValueError: a name is not in ``id2label``.
    """
    named = (is_named(train_y), is_named(calib_y))
    if not any(named):
        return train_y, calib_y, id2label
    if not all(named) and all(_has_rows(y) for y in (train_y, calib_y)):
        raise TypeError(
            "train_y and calib_y must both hold label names or both class indices "
            f"(train_y: {'names' if named[0] else 'indices'}, calib_y: {'names' if named[1] else 'indices'})"
        )
    if id2label is None:
        seen = {str(v) for y in (train_y, calib_y) if is_named(y) for v in _values(y)}
        id2label = dict(enumerate(sorted(seen)))
    label2id = {v: k for k, v in id2label.items()}
    return names_to_ids(train_y, "train_y", label2id), names_to_ids(calib_y, "calib_y", label2id), dict(id2label)


def _values(y: Any) -> list:
    return y.tolist() if isinstance(y, np.ndarray) else list(y)


def _has_rows(y: Any) -> bool:
    try:
        return len(y) > 0
    except TypeError:
        return False
