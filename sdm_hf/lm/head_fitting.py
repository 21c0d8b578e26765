"""Fitting verification heads on encoded document rows, once for all processes of a run.

Every process computes the features of its block of rows; the main process fits the head (a
seeded 50/50 split, :func:`~sdm_hf.lm.verification.fit_split_head`) and sends it to the others as
plain state (Schmaltz 2025, *Similarity-Distance-Magnitude Language Models*, arXiv:2510.26183, Sec. 3.2).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..head.modeling import SDMHead
from ..utils.distributed import broadcast_json
from .distributed import broadcast_head
from .verification import fit_split_head, head_metrics, rows_verification_features

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .sdm_config import SDMTrainingArguments

__all__ = ["VerificationHeadFitter"]


class VerificationHeadFitter:
    """Fits the run's verification heads with its ``head_*`` settings.

    Args:
        args: the run's :class:`~sdm_hf.lm.SDMTrainingArguments`.
        tokenizer: the tokenizer (its pad id pads the feature batches).
        model: returns the model being trained.
        world: returns ``(rank, size)`` of the run's processes.
    """

    def __init__(
        self,
        args: SDMTrainingArguments,
        tokenizer: PreTrainedTokenizerBase,
        model: Callable[[], torch.nn.Module],
        world: Callable[[], tuple[int, int]],
    ):
        self.args, self.tokenizer, self.model, self._world = args, tokenizer, model, world

    def features(self, rows: list[dict]) -> torch.Tensor:
        """Verification-head features ``[N, 2H]`` of encoded rows (each cut after its final
        ``<verified>`` tag, pooled by ``verification_pooling`` at ``verification_layer``; float32,
        CPU; :func:`~sdm_hf.lm.verification.rows_verification_features`). With several processes
        a collective call (as ``Trainer.evaluate``): every process must make it."""
        return rows_verification_features(
            self.model(),
            rows,
            int(self.tokenizer.pad_token_id),
            max(1, self.args.per_device_eval_batch_size),
            self.args.verification_layer,
            self.args.verification_pooling,
            self._world(),
            progress=False,
        )

    def fit(
        self,
        rows: list[dict],
        seed: int,
        timing: dict | None = None,
        features: torch.Tensor | None = None,
        keep_texts: bool = False,
        calibration_mask: torch.Tensor | None = None,
    ) -> tuple[SDMHead | None, torch.Tensor]:
        """Fit a verification head on encoded ``rows`` (their ``reward`` is the label): the
        features of :meth:`features`, then
        :func:`~sdm_hf.lm.verification.fit_split_head` (a seeded 50/50 split into the head's
        own training and calibration halves) with the run's ``head_*`` settings.

        Args:
            rows: :func:`~sdm_hf.lm.masks.encode_example` rows with ``document_id``.
            seed: seeds the split and the fit.
            timing: when given, receives ``head_features_seconds`` and ``head_fit_seconds``.
            keep_texts: store each row's completion text with the head (the final head's
                explanations); training-time heads keep none, so checkpoint pushes carry no
                training text.
            calibration_mask: ``[N]`` bool, the rows that calibrate (None: a seeded 50/50 split).

        Returns ``(head or None, support_row)`` as :func:`~sdm_hf.lm.verification.fit_split_head`.
        """
        timing = timing if timing is not None else {}
        started = time.perf_counter()
        feats = self.features(rows) if features is None else features
        if features is None:
            timing["head_features_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        labels = torch.tensor([r["reward"] for r in rows])
        doc_ids = torch.tensor([r["document_id"] for r in rows])
        base_model = getattr(getattr(self.model(), "config", None), "_name_or_path", None)
        texts = [r["text"] for r in rows] if keep_texts else None
        options: dict[str, Any] = dict(base_model=base_model, progress=False, texts=texts)
        head, support_row = fit_split_head(
            feats, labels, doc_ids, self.args, seed, calibration_mask=calibration_mask, **options
        )
        if head is not None:
            timing["head_fit_seconds"] = time.perf_counter() - started
        return head, support_row

    def fit_shared(
        self,
        rows: list[dict],
        seed: int,
        timing: dict | None = None,
        keep_texts: bool = False,
        calibration_mask: torch.Tensor | None = None,
    ) -> tuple[SDMHead | None, torch.Tensor]:
        """:meth:`fit` once for all processes: every process computes its block
        of the features (:meth:`features`), the main process fits, and the head
        (or the main process's error, raised on every process: none is left waiting) is sent to
        the others. With one process it is :meth:`fit`."""
        timing = timing if timing is not None else {}
        world = self._world()
        started = time.perf_counter()
        feats = self.features(rows)
        timing["head_features_seconds"] = time.perf_counter() - started
        n_ids = 1 + max((int(r["document_id"]) for r in rows), default=-1)
        head, support_row, problem = None, torch.full((n_ids,), -1, dtype=torch.long), ""
        failure: Exception | None = None
        if world[0] == 0:
            try:
                options: dict[str, Any] = dict(
                    timing=timing, features=feats, keep_texts=keep_texts, calibration_mask=calibration_mask
                )
                head, support_row = self.fit(rows, seed=seed, **options)
                if head is not None:
                    timing.update({f"head_{k}": v for k, v in head_metrics(head).items()})
            except Exception as error:  # raised below on every process
                if world[1] == 1:
                    raise
                failure, problem = error, f"{type(error).__name__}: {error}"
        problem = broadcast_json(problem, world)
        if failure is not None:
            raise failure
        if problem:
            raise RuntimeError(f"fitting the verification head failed on the main process: {problem}")
        head, support_row = broadcast_head(head, support_row, world)
        timing.update(broadcast_json(timing, world))  # every process logs the same figures
        return head, support_row
