"""The epoch machinery of :class:`~sdm_hf.lm.SDMTrainer` (Schmaltz 2025, *Similarity-Distance-Magnitude
Language Models*, arXiv:2510.26183, Sec. 3.2-3.4): each epoch draws every document's version
(positive with probability ``gamma_pos``), generates online hard negatives and refits the
verification head on the documents split 50/50 (seeded per epoch).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..head.fit_selection import FitSelection
from ..head.modeling import SDMHead
from ..utils.distributed import gather_json, gather_lists
from ..utils.logging import get_logger
from .control import ControlTokens
from .data import Document, VersionDataset, encode_documents, negative_only_documents, prepare_documents
from .final_head import CALIBRATIONS, FINAL_HEAD_SOURCES, final_head_rows
from .generation import generate_greedy
from .head_fitting import VerificationHeadFitter
from .masks import encode_example
from .state import SDMEpochState, refresh_summary

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .sdm_config import SDMTrainingArguments

logger = get_logger(__name__)

__all__ = ["SDMEpochs"]


class SDMEpochs:
    """The SDM side of one training run: documents, their per-epoch versions, hard negatives and
    the verification heads. :class:`~sdm_hf.lm.SDMTrainer` builds one and hands it to its epoch
    callbacks; it knows the trainer only through the callables it is given.

    Args:
        args: the run's :class:`~sdm_hf.lm.SDMTrainingArguments`.
        tokenizer: the tokenizer (its pad id is set).
        model: returns the model being trained (the trainer's current ``model``).
        world: returns ``(rank, size)`` of the run's processes.
        collate: the trainer's data collator (a batch rebuilt after in-batch hard negatives).
        log: the trainer's ``log`` (TensorBoard, W&B, ``state.log_history``).
        control_tokens, verifier: the control strings and the verifier ``r(positive, generation)``.
        documents: the training documents; negative_only_documents: prompts without a positive
            (head data only); eval_sets: evaluation documents by name (the first calibrates);
            eval_negative_only_documents: the first evaluation set's prompts without a positive.
        encoded: every static version's :func:`~sdm_hf.lm.masks.encode_example` row by
            ``(document id, text)``; generated versions join it.
    """

    def __init__(
        self,
        args: SDMTrainingArguments,
        tokenizer: PreTrainedTokenizerBase,
        *,
        model: Callable[[], torch.nn.Module],
        world: Callable[[], tuple[int, int]],
        collate: Callable[[list[dict]], dict[str, Any]],
        log: Callable[[dict[str, float]], None],
        control_tokens: ControlTokens,
        verifier: Callable[[str, str], bool],
        documents: list[Document],
        negative_only_documents: list[Document],
        eval_sets: dict[str, list[Document]],
        eval_negative_only_documents: list[Document],
        encoded: dict[tuple[int, str], dict],
    ):
        self.args = args
        self.processing_class = tokenizer
        self._model, self._world, self.collate, self.log = model, world, collate, log
        self.control_tokens, self.verifier = control_tokens, verifier
        self.documents, self.negative_only_documents = documents, negative_only_documents
        self.eval_sets, self.eval_negative_only_documents = eval_sets, eval_negative_only_documents
        self.eval_documents: list[Document] | None = next(iter(eval_sets.values()), None)
        self._encoded = encoded
        self.epoch_state = SDMEpochState()
        self.epoch_log: list[dict] = []
        self.head: SDMHead | None = None
        # what the loss uses: the epoch's head, or the evaluation head while evaluating
        self.loss_head: SDMHead | None = None
        self.loss_support_row: torch.Tensor | None = None
        self.head_epoch: int | None = None
        self._logged_epochs: set[int] = set()
        self.train_versions = VersionDataset()
        self.eval_version_sets = {name: VersionDataset() for name in eval_sets}
        self.eval_versions = next(iter(self.eval_version_sets.values()), VersionDataset())
        self.final_head_generations: list[str] | None = None
        self.final_head_generated_negatives = 0
        self.final_head_calibration = "mixed"
        self.heads = VerificationHeadFitter(args, tokenizer, model, world)

    @classmethod
    def from_datasets(
        cls,
        args: SDMTrainingArguments,
        tokenizer: PreTrainedTokenizerBase,
        train_dataset: Any,
        eval_dataset: Any = None,
        *,
        control_tokens: ControlTokens,
        append_control: bool = True,
        **collaborators: Any,
    ) -> SDMEpochs:
        """The run of TRL preference datasets: documents prepared, every static version tokenized once.

        Args:
            train_dataset: the training preference dataset.
            eval_dataset: one evaluation dataset, ``{name: dataset}`` (the first calibrates) or None.
            append_control: add missing control suffixes (True) or reject such rows.
            collaborators: ``model``, ``world``, ``collate``, ``log`` and ``verifier`` as for the constructor.

        Raises:
            ValueError: no training document with a positive, an empty dict, or an evaluation set
                without a document with a positive.
        """
        documents, aside = prepare_documents(train_dataset, control_tokens, append_control)
        if not documents:
            raise ValueError(
                "train_dataset has no trainable document (it is empty, or no prompt has a positive completion)"
            )
        # evaluation sets by name ("" for a single one); the first is the calibration set
        named = (
            eval_dataset if isinstance(eval_dataset, dict) else {"": eval_dataset} if eval_dataset is not None else {}
        )
        if isinstance(eval_dataset, dict) and not eval_dataset:
            raise ValueError("eval_dataset is an empty dict: pass None or {name: dataset, ...}")
        prepared = {str(name): prepare_documents(data, control_tokens, append_control) for name, data in named.items()}
        eval_sets: dict[str, list[Document]] = {name: docs for name, (docs, _) in prepared.items()}
        empty = [name or "eval_dataset" for name, docs in eval_sets.items() if not docs]
        if empty:
            raise ValueError(f"evaluation set {empty[0]!r} has no document with a positive completion")
        first = next(iter(prepared.values()), ([], []))
        # prompts without a positive: verification-head data only (ids after the documents')
        negative_only = negative_only_documents(aside, len(documents))
        eval_negative_only = negative_only_documents(first[1], len(first[0]))
        # every static version tokenized once (datasets.map); generated hard negatives join later
        encoded = encode_documents(
            tokenizer,
            documents + negative_only + eval_negative_only + [d for docs in eval_sets.values() for d in docs],
            control_tokens,
            args.max_length,
            num_proc=args.dataset_num_proc,
        )
        return cls(
            args,
            tokenizer,
            control_tokens=control_tokens,
            documents=documents,
            negative_only_documents=negative_only,
            eval_sets=eval_sets,
            eval_negative_only_documents=eval_negative_only,
            encoded=encoded,
            **collaborators,
        )

    @property
    def model(self) -> torch.nn.Module:
        """The model being trained."""
        return self._model()

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's (``processing_class``) padding id; the trainer sets it to eos if unset."""
        return int(self.processing_class.pad_token_id)

    @property
    def hard_negatives(self) -> dict[int, list[str]]:
        """This epoch's wrong generations per document id (suffix forced to No)."""
        return self.epoch_state.hard_negatives

    # -- documents and versions -----------------------------------------------------------
    def _encode(self, doc: Document, text: str, positive: bool) -> dict:
        key = (doc.id, text)
        if key not in self._encoded:
            row = encode_example(
                self.processing_class, doc.prompt, text, positive, self.control_tokens, max_length=self.args.max_length
            )
            row["document_id"] = doc.id
            row["text"] = text  # kept for checkpoints; the collator ignores it
            self._encoded[key] = row
        return self._encoded[key]

    def _draw_versions(self, documents, rng, negatives_of) -> tuple[list[str], list[bool]]:
        texts, rewards = [], []
        for doc in documents:  # one random draw per document
            pool = negatives_of(doc)
            if not pool or rng.random() < self.args.gamma_pos:
                texts.append(doc.positive)
                rewards.append(True)
            else:
                texts.append(pool[int(rng.integers(len(pool)))])
                rewards.append(False)
        return texts, rewards

    def start_epoch(self, epoch: int) -> None:
        """Prepare ``epoch`` (0-based): :meth:`prepare_epoch_versions`, then
        :meth:`refresh_verification_head`. Doing it twice for one epoch does nothing more."""
        self.prepare_epoch_versions(epoch)
        self.refresh_verification_head(epoch)

    def prepare_epoch_versions(self, epoch: int) -> None:
        """Draw each training document's version for ``epoch`` and generate hard negatives.

        A document trains its positive with probability ``gamma_pos``, else one of its static
        negatives drawn uniformly; from ``hard_negatives_from_epoch`` on, a document on the
        negative branch is, with probability ``gamma_gen``, generated for greedily, and a
        wrong generation (by the verifier) becomes a cached hard negative that replaces the
        static negative with probability ``gamma_diversity`` (Schmaltz 2025, SDM language
        models, Sec. 3.3). Every draw comes from one generator seeded by ``(seed, epoch)``.
        The evaluation versions are drawn once, from their own seed. Appends the epoch's
        ``epoch_log`` entry; a second call for the same epoch does nothing.
        """
        state = self.epoch_state
        if state.prepared_epoch == epoch:
            return
        state.prepared_epoch = epoch
        args = self.args
        rng = np.random.default_rng([args.seed, epoch, 1])
        in_epoch = args.hard_negative_timing == "in_epoch"
        if in_epoch:  # each process cached what it generated for its own batches: merge them
            self.sync_in_epoch_state()
        state.pending_generation = {}
        state.previous_hard_negatives, state.hard_negatives = state.hard_negatives, {}
        texts, rewards = self._draw_versions(self.documents, rng, lambda d: d.negatives)
        generate = [
            i
            for i, positive in enumerate(rewards)
            if not positive and epoch >= args.hard_negatives_from_epoch and rng.random() < args.gamma_gen
        ]
        started = time.perf_counter()
        if in_epoch:  # generated when the document's batch comes, with the weights of that step
            coins = rng.random(len(generate)) < args.gamma_diversity  # pre-drawn: outcomes shift no draw
            state.pending_generation = {self.documents[i].id: bool(c) for i, c in zip(generate, coins)}
        elif generate:
            self._generate_hard_negatives(generate, texts, rng)
        generation_seconds = time.perf_counter() - started
        state.versions = [(doc.id, text, positive) for doc, text, positive in zip(self.documents, texts, rewards)]
        self.train_versions.rows = [self._encode(self.documents[i], t, r) for i, t, r in state.versions]
        for name, documents in self.eval_sets.items():
            if not self.eval_version_sets[name].rows:
                self.eval_version_sets[name].rows = self.evaluation_rows(documents)
        self.epoch_log.append(
            {
                "epoch": epoch,
                "generated": 0 if in_epoch else len(generate),
                "hard_negatives": sum(len(v) for v in state.hard_negatives.values()),
                "generation_seconds": generation_seconds,
                "head_features_seconds": 0.0,
                "head_fit_seconds": 0.0,
            }
        )

    def refresh_verification_head(self, epoch: int) -> None:
        """Refit the training-time verification head for ``epoch`` (with ``use_sdm_loss``).

        Each document contributes one version, drawn as in :meth:`prepare_epoch_versions`
        but from its own seed and with the previous epoch's hard negatives added to its
        negatives, and each prompt without a positive (``negative_only_documents``) one of its
        negatives; the head is fitted on the main process (:class:`~sdm_hf.lm.head_fitting.VerificationHeadFitter`) and
        broadcast to the others (Schmaltz 2025, SDM language models, Sec. 3.2). The timings
        go into the epoch's ``epoch_log`` entry; a second call for the same epoch does nothing.

        Raises:
            ValueError: :meth:`prepare_epoch_versions` has not prepared ``epoch`` yet (the
                head draws from the hard negatives it moves to the previous epoch's cache).
        """
        if self.head_epoch == epoch:
            return
        state = self.epoch_state
        if state.prepared_epoch != epoch:
            raise ValueError(
                f"epoch {epoch} has no versions yet: call prepare_epoch_versions({epoch}) first "
                f"(or start_epoch({epoch}), which does both)"
            )
        self.head_epoch = epoch
        if not self.args.use_sdm_loss:
            return
        previous = state.previous_hard_negatives
        head_rng = np.random.default_rng([self.args.seed, epoch, 3])
        texts, rewards = self._draw_versions(self.documents, head_rng, lambda d: d.negatives + previous.get(d.id, []))
        rows = [self._encode(d, t, r) for d, t, r in zip(self.documents, texts, rewards)]
        # prompts without a positive contribute one of their negatives (head data only)
        rows += [
            self._encode(d, d.negatives[int(head_rng.integers(len(d.negatives)))], False)
            for d in self.negative_only_documents
        ]
        n_ids = len(self.documents) + len(self.negative_only_documents)
        timing: dict[str, float] = {}
        # features on every process (a block each), fitted once on the main process, shared
        seed = int(self.args.seed) * 1000 + epoch
        self.head, state.support_row = self.heads.fit_shared(rows, seed=seed, timing=timing)
        if state.support_row.numel() < n_ids:  # no head: every document id maps to no support row
            state.support_row = torch.full((n_ids,), -1, dtype=torch.long)
        self.loss_head, self.loss_support_row = self.head, state.support_row
        if self.epoch_log and self.epoch_log[-1]["epoch"] == epoch:
            self.epoch_log[-1].update(timing)

    def generate_in_batch(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """``hard_negative_timing="in_epoch"``: generate for the batch's documents scheduled for a
        hard negative this epoch, with the current weights (as the paper does, Schmaltz 2025,
        SDM language models, Sec. 3.3). A wrong generation is cached for the next head refresh
        and, if its pre-drawn ``gamma_diversity`` coin says so, replaces the document's static
        negative in this very batch (the batch is collated again). Returns ``inputs`` or the
        new batch. The token count the Trainer took from the drawn batch is kept: a negative
        trains only its control string, so swapping one negative for another keeps it."""
        ids = inputs["document_id"].tolist()
        pending = self.epoch_state.pending_generation
        todo = list(dict.fromkeys(d for d in ids if d in pending))  # a document twice in a batch: once
        if not todo:
            return inputs
        coins = {d: pending.pop(d) for d in todo}
        started = time.perf_counter()
        outputs = self.generate_completions([self.documents[d] for d in todo])
        replaced: dict[int, dict] = {}
        for d, generation in zip(todo, outputs):
            negative = self.wrong_generation(self.documents[d], generation)
            if negative is None:
                continue
            self.epoch_state.hard_negatives.setdefault(d, []).append(negative)
            if coins[d]:
                replaced[d] = self._encode(self.documents[d], negative, False)
        if self.epoch_log:
            self.epoch_log[-1]["generated"] += len(todo)
            self.epoch_log[-1]["generation_seconds"] += time.perf_counter() - started
        if not replaced:
            return inputs
        rows = [replaced.get(d, self.train_versions.rows[d]) for d in ids]  # version rows are in id order
        return self.collate(rows)

    def sync_in_epoch_state(self) -> None:
        """``hard_negative_timing="in_epoch"`` with several processes: every process generated
        for its own batches, so merge the hard-negative caches (union) and what is still to be
        generated (the documents no process has reached yet) into one state on every process.
        A collective call (every process must make it); nothing to do with one process."""
        world = self._world()
        if world[1] == 1 or self.args.hard_negative_timing != "in_epoch":
            return
        state = self.epoch_state
        local = {
            "pending": sorted(state.pending_generation),
            "hard": sorted([int(k), list(v)] for k, v in state.hard_negatives.items()),
        }
        parts = gather_json(local, world)
        still = set.intersection(*(set(p["pending"]) for p in parts))
        state.pending_generation = {d: c for d, c in state.pending_generation.items() if d in still}
        merged: dict[int, list[str]] = {}
        for part in parts:
            for doc_id, negatives in part["hard"]:
                merged.setdefault(int(doc_id), []).extend(n for n in negatives if n not in merged.get(int(doc_id), []))
        state.hard_negatives = dict(sorted(merged.items()))

    def generate_shared(self, documents: list[Document]) -> list[str]:
        """:meth:`generate_completions` of ``documents`` with the work shared between processes
        (process ``r`` takes documents ``r, r + P, ...``, padded with a repeat so every process
        makes the same generate calls, as FSDP / ZeRO-3 need); every process gets all of them,
        in order."""
        world = self._world()
        rank, size = world
        if size == 1 or not documents:
            return self.generate_completions(documents)
        mine = list(range(rank, len(documents), size))
        share = -(-len(documents) // size)
        padded = mine + [mine[-1] if mine else 0] * (share - len(mine))
        outputs = self.generate_completions([documents[i] for i in padded])[: len(mine)]
        return [text for _, text in sorted(gather_lists(list(zip(mine, outputs)), world))]

    def evaluation_rows(self, documents: list[Document], encoded: dict | None = None) -> list[dict]:
        """The encoded version of each evaluation document: drawn like a training version
        (positive with probability ``gamma_pos``) from a fixed seed, so every evaluation of a
        set sees the same versions. ``encoded``: rows by ``(document id, text)`` for documents
        that are not this run's own (:func:`~sdm_hf.lm.data.encode_documents`)."""
        rng = np.random.default_rng([self.args.seed, 2])
        texts, rewards = self._draw_versions(documents, rng, lambda d: d.negatives)
        if encoded is not None:
            return [encoded[(d.id, t)] for d, t in zip(documents, texts)]
        return [self._encode(d, t, r) for d, t, r in zip(documents, texts, rewards)]

    @property
    def _progress(self) -> bool:
        """Refresh steps inside the Trainer show no bars of their own (the Trainer's is the one
        bar; nested bars garble a terminal); each refresh logs one line instead."""
        return False

    def log_epoch_refresh(self, epoch: int) -> None:
        """Send ``epoch``'s ``epoch_log`` entry through ``Trainer.log`` (so TensorBoard, W&B and
        ``state.log_history`` get it), keys prefixed ``sdm/``: ``generated``, ``hard_negatives``,
        ``generation_seconds``, ``head_features_seconds``, ``head_fit_seconds`` and, after a
        head fit, ``head_calibration_loss``, ``head_calibration_accuracy``, ``head_hr_empty``,
        ``head_q_min`` (when the high-reliability region is not empty) and ``head_hr_admission``.
        Once per epoch; the main process also logs it as one readable line (``logging``, INFO,
        logger ``sdm_hf.lm.epochs``)."""
        entry = next((e for e in reversed(self.epoch_log) if e["epoch"] == epoch), None)
        if entry is None or epoch in self._logged_epochs:
            return
        self._logged_epochs.add(epoch)
        if self._world()[0] == 0:
            logger.info(refresh_summary(entry))
        self.log({f"sdm/{k}": float(v) for k, v in entry.items() if k != "epoch"})

    def generate_completions(self, documents: list[Document]) -> list[str]:
        """Greedy, batched, left-padded generation (KV cache on) from each document's prompt."""
        return generate_greedy(
            self.model,
            self.processing_class,
            [doc.prompt for doc in documents],
            self.args.max_new_tokens,
            self.args.per_device_eval_batch_size,
            progress=self._progress,
        )

    def wrong_generation(self, doc: Document, generation: str) -> str | None:
        """The generation as a negative (suffix forced to No), or None when the verifier r
        judges its content correct (a correct generation is never a negative)."""
        content = self.control_tokens.remove_suffix(generation)
        if self.verifier(self.control_tokens.remove_suffix(doc.positive), content):
            return None
        return self.control_tokens.add(content, False)

    def _generate_hard_negatives(self, indices: list[int], texts: list[str], rng) -> None:
        # With several processes each generates for its share and the results are merged, in
        # document order, on every process, so the caches and the remaining draws agree.
        outputs = self.generate_shared([self.documents[i] for i in indices])
        cache = self.epoch_state.hard_negatives
        for i, generation in zip(indices, outputs):
            doc = self.documents[i]
            negative = self.wrong_generation(doc, generation)
            if negative is None:
                continue
            cache.setdefault(doc.id, []).append(negative)
            if rng.random() < self.args.gamma_diversity:
                texts[i] = negative

    def build_final_head(
        self, generate: bool = True, calibration: str = "mixed", generations: list[str] | None = None
    ) -> SDMHead:
        """The test-time verification head, fitted on the evaluation (calibration) documents only
        (:mod:`sdm_hf.lm.final_head`): ``calibration="mixed"`` (the papers' procedure, Sec. 3.4:
        positives, static negatives and, with ``generate``, wrong greedy generations, split at
        random; a promise about that mix) or ``"generations"`` (half of the prompts calibrate on
        the model's own greedy generations labelled by the verifier; a promise about its outputs).

        It becomes ``self.head`` (saved by :meth:`save_sdm_model`, with ``selection`` recording
        the calibration rows); the greedy generations are kept in ``self.final_head_generations``
        (pass them as ``generations`` to build another head without generating again). With
        several processes every process must call it (the head is fitted on the main process).

        Raises:
            ValueError: no evaluation set, an unknown ``calibration``, ``generations`` of the wrong
                length, or too few positives and negatives (or right and wrong generations).
        """
        if not self.eval_versions.rows or self.eval_documents is None:
            raise ValueError("build_final_head needs eval_dataset (the calibration set)")
        if calibration not in CALIBRATIONS:  # checked before any generation
            raise ValueError(f"calibration must be 'mixed' or 'generations', got {calibration!r}")
        documents = self.eval_documents
        if generations is None and (generate or calibration == "generations"):
            generations = self.generate_shared(documents)
        if generations is not None and len(generations) != len(documents):
            raise ValueError(
                f"generations must hold one text per evaluation document ({len(documents)}), got {len(generations)}"
            )
        self.final_head_generations = None if generations is None else list(generations)
        rows, mask, generated = final_head_rows(
            documents,
            self.eval_negative_only_documents,
            generations,
            calibration,
            int(self.args.seed) + 98,
            self.control_tokens,
            self.verifier,
            self._encode,
            wrong_as_negatives=generate,
        )
        # the final head keeps its completion texts: its nearest exemplars explain with them
        head, _ = self.heads.fit_shared(rows, seed=int(self.args.seed) + 99, keep_texts=True, calibration_mask=mask)
        if head is None:
            raise ValueError("not enough positives and negatives in the evaluation set for a head")
        self.final_head_generated_negatives = generated
        self.final_head_calibration = calibration
        # saved with the head (config.json "selection"): which rows its promise is about
        head.selection = head.selection if head.selection is not None else FitSelection()
        head.selection["calibration_source"] = FINAL_HEAD_SOURCES[calibration]
        self.head = head
        return head
