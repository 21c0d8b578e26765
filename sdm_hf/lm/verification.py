"""Fitting a document-level verification head on one set of documents split into the head's own training
and calibration halves (Schmaltz 2025, *Similarity-Distance-Magnitude Language Models*, arXiv:2510.26183,
Sec. 3.2, App. A.1): at every epoch start, before every evaluation, and for the test-time head.
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
from ..utils.logging import get_logger
from .verification_features import prefix_features, verification_feature_pooling

logger = get_logger(__name__)

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
    """Verification features of N encoded rows, each cut after its ``verified_position`` and pooled by
    :func:`~sdm_hf.lm.verification_features.prefix_features`.

    A collective call with ``world = (rank, size)``: every process must make it; each computes whole
    length-sorted batches, so the features do not depend on the number of processes.

    Returns:
        ``(N, 2H)`` float32 CPU (``(N, H)`` for ``"last"`` / ``"mean"``), on every process, in row order.
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
    """Fit a 2-class (No/Yes) SDM head on ``features`` split into training and calibration halves.

    The fit uses ``args``' ``head_*`` settings and ``alpha`` with ``resplit=False``, its warnings silenced;
    ``head_procedure="auto"`` with fewer than 4 training rows of a class uses ``"fast"`` instead
    (``head.selection["procedure"]`` says which).

    Args:
        features: ``(N, D)`` float32 verification features, one row per document version.
        labels: ``(N,)`` long, 1 for a positive, 0 for a negative.
        document_ids: ``(N,)`` long, distinct non-negative ids.
        seed: seeds the split and the fit.
        base_model: recorded in the head's config.
        texts: N document texts, kept with the head's support and calibration rows.
        calibration_mask: ``(N,)`` bool, True for the rows Algorithm 1 calibrates on; None: a 50/50 split by
            a permutation seeded with ``seed``.

    Returns:
        ``(head, support_row)``: the head, or None (logged as a warning: beta = e) when a half has fewer than 2
        rows of a class; ``support_row`` ``(max id + 1,)`` long maps each document id in the training half to
        its support row, -1 elsewhere (so a document is not its own nearest neighbour).

    Raises:
        ValueError: ``calibration_mask`` of another shape than ``labels``.
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
        logger.warning("too few positives or negatives to fit a verification head: beta = e")
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
    """A verification head's fit as loggable floats: ``hr_empty`` (1.0: empty region), ``hr_admission`` (share
    of calibration rows admitted), ``q_min`` (non-empty region only), and when recorded the selected state's
    ``calibration_loss`` (class-balanced SDM loss) and ``calibration_accuracy``."""
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
