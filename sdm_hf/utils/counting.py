"""Counting admitted and correct points per group, shared by the calibration reports, model cards and metrics.

An empty group's accuracy is None, shown as "R" (everything rejected)."""

from __future__ import annotations

import torch

__all__ = ["label_names", "group_counts", "accuracy_or_none", "format_accuracy"]


def label_names(num_classes: int, id2label: dict[int, str] | None = None) -> list:
    """Display names of classes ``0..C-1``: ``id2label[c]``, or ``"c"`` when no names are set.

    Example:
        >>> label_names(3), label_names(2, {0: "no", 1: "yes"})
        (['0', '1', '2'], ['no', 'yes'])
    """
    return [id2label[c] if id2label else str(c) for c in range(num_classes)]


def group_counts(
    groups: torch.Tensor, admit: torch.Tensor, correct: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group counts ``(n, admitted, correct)``, each ``[C]`` int64.

    Args:
        groups: ``[N]`` int64 group of each point (true label or prediction); outside ``0..C-1``: no group.
        admit: ``[N]`` bool, True where the point is admitted.
        correct: ``[N]`` bool, True where the prediction is right (counted only if admitted).
        num_classes: ``C``.

    Example:
        >>> import torch
        >>> n, a, k = group_counts(torch.tensor([0, 1, 1]), torch.tensor([True, True, False]),
        ...                        torch.tensor([True, False, True]), 2)
        >>> n.tolist(), a.tolist(), k.tolist()
        ([1, 2], [1, 1], [1, 0])
    """
    admit, correct = admit.bool(), correct.bool()
    member = (groups >= 0) & (groups < num_classes)
    n = torch.bincount(groups[member], minlength=num_classes)
    admitted = torch.bincount(groups[member & admit], minlength=num_classes)
    right = torch.bincount(groups[member & admit & correct], minlength=num_classes)
    return n, admitted, right


def accuracy_or_none(correct: int, admitted: int) -> float | None:
    """``correct / admitted``, or None ("R": all rejected) when nothing is admitted."""
    return float(correct) / admitted if admitted else None


def format_accuracy(accuracy: float | None, digits: int = 3) -> str:
    """An accuracy for a table: ``"0.962"``, or ``"R"`` when the group admits nothing.

    Example:
        >>> format_accuracy(0.96153), format_accuracy(None)
        ('0.962', 'R')
    """
    return "R" if accuracy is None else f"{accuracy:.{digits}f}"
