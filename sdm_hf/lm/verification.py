"""Fitting a document-level verification head on one set of documents split in halves.

SDM fine-tuning fits such a head at every epoch start (on the training documents), before
every evaluation (on the calibration documents) and once at the end (the test-time head):
each time the documents are split at random into the head's own training and calibration
halves (Schmaltz 2025, *Similarity-Distance-Magnitude Language Models*, arXiv:2510.26183,
Sec. 3.2 and App. A.1).
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import torch

from ..head.config import SDMConfig
from ..head.modeling import SDMHead
from ..training.fit import fit_sdm_head
from ..utils.distributed import gather_rows
from .verification_features import prefix_features, verification_feature_pooling

if TYPE_CHECKING:
    from .sdm_config import SDMTrainingArguments

__all__ = ["fit_split_head", "head_metrics", "rows_verification_features"]


def rows_verification_features(
    model: torch.nn.Module,
    rows: list[dict],
    pad_token_id: int,
    batch_size: int,
    layer: int,
    pooling: str,
    world: tuple[int, int],
    progress: bool = False,
) -> torch.Tensor:
    """Verification features ``[N, 2H]`` (float32, CPU) of encoded rows, each cut after its
    ``verified_position`` and pooled by :func:`~sdm_hf.lm.verification_features.prefix_features`.

    The rows are sorted by length and cut into whole batches before they are shared, so every
    batch (its rows, its padding) is the same whatever the number of processes; with several
    (``world`` = ``(rank, size)``) each computes a block and all get every row back: a
    collective call that every process must make.
    """
    ids = [list(r["input_ids"][: int(r["verified_position"]) + 1]) for r in rows]
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
    order = torch.argsort(lengths, stable=True).tolist()

    def features(part: list[int]) -> torch.Tensor:
        return prefix_features(
            model,
            [ids[order[i]] for i in part],
            pad_token_id,
            batch_size=batch_size,
            layer=layer,
            pooling=pooling,
            progress=progress,
        )

    sorted_features = gather_rows(len(ids), features, world, multiple=batch_size)
    result = torch.empty_like(sorted_features)
    result[torch.as_tensor(order, dtype=torch.long)] = sorted_features
    return result


def fit_split_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    document_ids: torch.Tensor,
    args: SDMTrainingArguments,
    seed: int,
    base_model: str | None = None,
    progress: bool = False,
    texts: list[str] | None = None,
    calibration_mask: torch.Tensor | None = None,
) -> tuple[SDMHead | None, torch.Tensor]:
    """Fit a 2-class (No/Yes) SDM head on ``features`` split 50/50 at random (or as given).

    The split is a permutation seeded by ``seed`` (the first half trains the head, the rest
    calibrates it), or ``calibration_mask`` when given; the fit uses the ``head_*`` settings
    and ``alpha`` of ``args`` with ``resplit=False``, and warnings of an empty high-reliability region, normal early in
    training, are silenced. With ``head_procedure="auto"`` and fewer than 4 rows of a class in
    the training half (too few to hold some out), that fit uses ``"fast"``'s selection instead
    (``head.selection["procedure"]`` says which).

    Args:
        features: ``[N, D]`` verification features, one row per document version.
        labels: ``[N]`` 1 for a positive, 0 for a negative.
        document_ids: ``[N]`` non-negative ids (each document appears once).
        args: :class:`~sdm_hf.lm.SDMTrainingArguments`.
        seed: seeds the split and the fit.
        base_model: recorded in the head's config (which model the features come from).
        progress: the fit's tqdm bar (shuffles x epochs).
        texts: ``[N]`` the documents' texts, kept with the head's support rows (the nearest
            exemplar's text explains a verdict) and calibration rows.
        calibration_mask: ``[N]`` bool, True for the rows Algorithm 1 calibrates on (the rest
            train the head); None: the seeded 50/50 split.

    Returns:
        ``(head, support_row)``: the head, or None (with a warning: beta = e) when a half has
        fewer than two rows of a class; ``support_row[document_id]`` is the head's support
        row of each document in its training half and -1 for the others, so a document is
        not its own nearest neighbour when the loss reads the head.
    """
    if calibration_mask is None:
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        train_idx, calib_idx = perm[: len(labels) // 2], perm[len(labels) // 2 :]
    else:
        mask = torch.as_tensor(calibration_mask, dtype=torch.bool)
        if mask.shape != labels.shape:
            raise ValueError(f"calibration_mask must have shape {tuple(labels.shape)}, got {tuple(mask.shape)}")
        train_idx, calib_idx = torch.nonzero(~mask).view(-1), torch.nonzero(mask).view(-1)
    half = len(train_idx)
    support_row = torch.full((int(document_ids.max()) + 1,), -1, dtype=torch.long)
    counts = [torch.bincount(labels[part], minlength=2) for part in (train_idx, calib_idx)]
    if any(int(c.min()) < 2 for c in counts):
        warnings.warn(
            "too few positives or negatives to fit a verification head this epoch: beta = e",
            UserWarning,
            stacklevel=3,
        )
        return None, support_row
    config = SDMConfig(
        input_dim=features.shape[1],
        num_classes=2,
        exemplar_dim=args.head_exemplar_dim,
        alpha=args.alpha,
        id2label={0: "No", 1: "Yes"},
        feature_pooling=verification_feature_pooling(args.verification_pooling),
        feature_layer=args.verification_layer,
        base_model=base_model,
    )
    settings = args.head_fit_settings()
    if settings["procedure"] == "auto" and int(counts[0].min()) < 4:
        # 'auto' holds training rows out to choose its settings and needs 4 of each class
        settings["procedure"] = "fast"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        head = fit_sdm_head(
            features[train_idx],
            labels[train_idx],
            features[calib_idx],
            labels[calib_idx],
            config,
            **settings,
            resplit=False,
            seed=seed,
            progress=progress,
            train_texts=None if texts is None else [texts[i] for i in train_idx.tolist()],
            calib_texts=None if texts is None else [texts[i] for i in calib_idx.tolist()],
        )
    support_row[document_ids[train_idx]] = torch.arange(half)
    head.compute_training_distance_lists()
    return head, support_row


def head_metrics(head: SDMHead) -> dict[str, float]:
    """What a verification head's fit and calibration say, as loggable floats: the selected
    state's balanced calibration SDM loss and calibration accuracy (of its own 50/50 split),
    ``hr_empty`` (1.0 when the high-reliability region is empty), ``q_min`` (only when it is
    not) and the share of calibration documents in that region."""
    rows = head.calibration_report(alphas=()).rows
    n = sum(r["n"] for r in rows)
    selection = getattr(head, "selection", None) or {}
    history = getattr(head, "training_history", None) or []
    key = (selection.get("shuffle"), selection.get("epoch"))
    chosen: dict = next((h for h in history if (h.get("shuffle"), h.get("epoch")) == key), {})
    empty = not math.isfinite(head.q_min)
    metrics = {"hr_empty": float(empty), "hr_admission": sum(r["admitted"] for r in rows) / max(n, 1)}
    if not empty:
        metrics["q_min"] = float(head.q_min)
    if "calibration_loss" in selection:
        metrics["calibration_loss"] = float(selection["calibration_loss"])
    if "calibration_accuracy" in chosen:
        metrics["calibration_accuracy"] = float(chosen["calibration_accuracy"])
    return metrics
