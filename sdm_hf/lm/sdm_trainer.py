"""``SDMTrainer``: fine-tune a causal LM with the SDM next-token loss.

The method is that of Schmaltz 2025, *Similarity-Distance-Magnitude Language Models*
(arXiv:2510.26183), Sec. 3: a ``transformers.Trainer`` subclass that overrides only what it must:

* ``compute_loss`` — the change-of-base loss (Sec. 3.2, Eq. 1) with ``beta_n = 2 +
  sdm(z')_{y_n}`` from the verification head, on features taken from the SAME forward pass
  (hidden states up to the last ``<verified>`` of each row, detached); ``use_sdm_loss=False``
  is plain cross-entropy over the same contrastive masks (the paper's baseline).
* ``evaluate`` — fits a separate head on the evaluation (calibration) set first, so
  ``eval_loss`` is the SDM loss (seeded document versions: comparable across evaluations)
  and ``load_best_model_at_end`` / ``metric_for_best_model="eval_loss"`` select the
  checkpoint with the lowest SDM loss over the calibration set, as the paper does.
* ``_save`` / ``_load_from_checkpoint`` — checkpoints also carry the current verification
  head (``sdm_head/``) and the epoch's :class:`~sdm_hf.lm.state.SDMEpochState`.

Every epoch begins (through the callbacks of :mod:`sdm_hf.lm.callbacks`, and once at
construction for epoch 0) by drawing each document's version (its positive with probability
``gamma_pos``, else a negative), generating online hard negatives from
``hard_negatives_from_epoch`` on (Sec. 3.3), and refitting the verification head on the
documents split 50/50 (seeded per epoch; Sec. 3.2, "training set SDM estimator").
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase, Trainer

from ..head.modeling import SDMHead
from .callbacks import HardNegativeCallback, HeadRefreshCallback
from .collator import ContrastiveMaskingCollator
from .data import Document, VersionDataset, encode_documents, prepare_documents
from .distributed import broadcast_head, gather_lists, process_world
from .encoding import ControlTokens, encode_example, generate_greedy, pool_verification_states, prefix_features
from .loss import accepts_logits_to_keep, sdm_next_token_loss, supervised_logit_mask
from .modeling import disable_dropout, eval_mode_hidden_states
from .sdm_config import SDMTrainingArguments
from .state import STATE_NAME, SDMEpochState
from .verification import fit_split_head

__all__ = ["SDMTrainer", "exact_match_verifier"]


def exact_match_verifier(positive: str, generation: str) -> bool:
    """Default verifier ``r``: exact match after stripping outer whitespace (both texts have
    their control suffixes removed before they get here)."""
    return positive.strip() == generation.strip()


class SDMTrainer(Trainer):
    """Trainer for SDM language models.

    Args:
        model: a causal LM (optionally PEFT-wrapped).
        args: :class:`SDMTrainingArguments`.
        train_dataset: a TRL preference dataset (paired or unpaired; see ``sdm_hf.lm.data``).
        eval_dataset: the same format; its verification head is fitted at every evaluation.
        processing_class: the tokenizer (kept by the Trainer as ``self.processing_class``).
        control_tokens: the control strings (default ``<verified>Yes/No</verified>``).
        verifier: ``r(positive, generation) -> bool`` on suffix-stripped content
            (default: exact match after stripping outer whitespace).
        append_control: add missing control suffixes (True) or reject such rows.

    After construction and at every epoch start, ``epoch_log`` gains one dict: ``epoch``,
    ``generated`` (hard-negative generations), ``hard_negatives`` (wrong ones cached), and
    ``generation_seconds``, ``head_features_seconds`` (the feature pass of the head refresh)
    and ``head_fit_seconds``. ``epoch_state`` (:class:`~sdm_hf.lm.state.SDMEpochState`) holds
    the epoch's versions, hard-negative caches and support rows: what checkpoints add.

    Example::

        args = SDMTrainingArguments(output_dir="out", num_train_epochs=3, per_device_train_batch_size=8,
                                    head_epochs=50, eval_strategy="epoch", save_strategy="epoch",
                                    load_best_model_at_end=True, metric_for_best_model="eval_loss")
        trainer = SDMTrainer(model=model, args=args, train_dataset=train, eval_dataset=calib,
                             processing_class=tokenizer)
        trainer.train()
        trainer.build_final_head()           # the test-time head, on the calibration set
        trainer.save_sdm_model("out/final")  # model + tokenizer + sdm_head/
    """

    args: SDMTrainingArguments  # narrowed from TrainingArguments: __init__ accepts only these
    model: torch.nn.Module  # narrowed from Optional: __init__ requires a model
    processing_class: PreTrainedTokenizerBase  # narrowed: __init__ requires the tokenizer
    loss_is_scaled_for_ga = True  # compute_loss divides by the accumulated batch's token count

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's (``processing_class``) padding id; ``__init__`` sets it to eos if unset."""
        return int(self.processing_class.pad_token_id)

    def __init__(
        self,
        model,
        args: SDMTrainingArguments,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        control_tokens: ControlTokens | None = None,
        verifier: Callable[[str, str], bool] | None = None,
        append_control: bool = True,
        **kwargs,
    ):
        # Overridden: the preference data become documents whose encoded versions change every
        # epoch, so the Trainer is given fixed datasets whose rows are replaced in place, the
        # contrastive-masking collator, and the epoch callbacks; epoch 0 is prepared here
        # because the Trainer sizes its loader from the dataset before the first epoch begins.
        if not isinstance(args, SDMTrainingArguments):
            raise TypeError("args must be SDMTrainingArguments")
        if processing_class is None:
            raise ValueError("SDMTrainer needs the tokenizer as processing_class")
        if train_dataset is None:
            raise ValueError("SDMTrainer needs a train_dataset in TRL preference format")
        if processing_class.pad_token_id is None:
            processing_class.pad_token = processing_class.eos_token
        self.control_tokens = control_tokens or ControlTokens()
        self.verifier = verifier or exact_match_verifier
        self.documents, _ = prepare_documents(train_dataset, self.control_tokens, append_control)
        self.eval_documents: list[Document] | None = None
        if eval_dataset is not None:
            self.eval_documents, _ = prepare_documents(eval_dataset, self.control_tokens, append_control)
        # every static version tokenized once (datasets.map); generated hard negatives join later
        self._encoded: dict[tuple[int, str], dict] = encode_documents(
            processing_class, self.documents + (self.eval_documents or []), self.control_tokens, args.max_length,
            num_proc=args.dataset_num_proc,
        )  # fmt: skip
        self.epoch_state = SDMEpochState()
        self._head_epoch: int | None = None
        self.head: SDMHead | None = None
        # what compute_loss uses: the epoch's head, or the evaluation head while evaluating
        self._loss_head: SDMHead | None = None
        self._loss_support_row: torch.Tensor | None = None
        self.epoch_log: list[dict] = []
        self._train_versions = VersionDataset()
        self._eval_versions = VersionDataset()
        super().__init__(
            model=model,
            args=args,
            train_dataset=self._train_versions,
            eval_dataset=self._eval_versions if eval_dataset is not None else None,
            processing_class=processing_class,
            data_collator=ContrastiveMaskingCollator(pad_token_id=processing_class.pad_token_id),
            **kwargs,
        )
        # compute_loss takes the accumulated batch's token count; this makes the Trainer pass it
        self.model_accepts_loss_kwargs = True
        self._lean_logits = bool(args.lean_logits) and accepts_logits_to_keep(model)
        if args.disable_dropout:
            disable_dropout(model)
        self.add_callback(HardNegativeCallback(self))
        self.add_callback(HeadRefreshCallback(self))
        self.start_epoch(0)

    @property
    def hard_negatives(self) -> dict[int, list[str]]:
        """This epoch's wrong generations per document id (suffix forced to No)."""
        return self.epoch_state.hard_negatives

    def _world(self) -> tuple[int, int]:
        return process_world(getattr(self, "accelerator", None))

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
        state.previous_hard_negatives, state.hard_negatives = state.hard_negatives, {}
        texts, rewards = self._draw_versions(self.documents, rng, lambda d: d.negatives)
        generate = [
            i
            for i, positive in enumerate(rewards)
            if not positive and epoch >= args.hard_negatives_from_epoch and rng.random() < args.gamma_gen
        ]
        started = time.perf_counter()
        if generate:
            self._generate_hard_negatives(generate, texts, rng)
        generation_seconds = time.perf_counter() - started
        state.versions = [(doc.id, text, positive) for doc, text, positive in zip(self.documents, texts, rewards)]
        self._train_versions.rows = [self._encode(self.documents[i], t, r) for i, t, r in state.versions]
        if self.eval_documents is not None and not self._eval_versions.rows:
            eval_rng = np.random.default_rng([args.seed, 2])  # the same versions at every evaluation
            e_texts, e_rewards = self._draw_versions(self.eval_documents, eval_rng, lambda d: d.negatives)
            self._eval_versions.rows = [
                self._encode(d, t, r) for d, t, r in zip(self.eval_documents, e_texts, e_rewards)
            ]
        self.epoch_log.append(
            {
                "epoch": epoch,
                "generated": len(generate),
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
        negatives; the head is fitted on the main process (:meth:`fit_verification_head`) and
        broadcast to the others (Schmaltz 2025, SDM language models, Sec. 3.2). The timings
        go into the epoch's ``epoch_log`` entry; a second call for the same epoch does nothing.

        Raises:
            ValueError: :meth:`prepare_epoch_versions` has not prepared ``epoch`` yet (the
                head draws from the hard negatives it moves to the previous epoch's cache).
        """
        if self._head_epoch == epoch:
            return
        state = self.epoch_state
        if state.prepared_epoch != epoch:
            raise ValueError(
                f"epoch {epoch} has no versions yet: call prepare_epoch_versions({epoch}) first "
                f"(or start_epoch({epoch}), which does both)"
            )
        self._head_epoch = epoch
        if not self.args.use_sdm_loss:
            return
        previous = state.previous_hard_negatives
        head_rng = np.random.default_rng([self.args.seed, epoch, 3])
        texts, rewards = self._draw_versions(self.documents, head_rng, lambda d: d.negatives + previous.get(d.id, []))
        rows = [self._encode(d, t, r) for d, t, r in zip(self.documents, texts, rewards)]
        head, support_row = None, torch.full((len(self.documents),), -1, dtype=torch.long)
        timing: dict[str, float] = {}
        world = self._world()
        if world[0] == 0:  # trained once, on the main process, then broadcast
            head, support_row = self.fit_verification_head(rows, seed=int(self.args.seed) * 1000 + epoch, timing=timing)
        self.head, state.support_row = broadcast_head(head, support_row, world)
        self._loss_head, self._loss_support_row = self.head, state.support_row
        if self.epoch_log and self.epoch_log[-1]["epoch"] == epoch:
            self.epoch_log[-1].update(timing)

    def generate_completions(self, documents: list[Document]) -> list[str]:
        """Greedy, batched, left-padded generation (KV cache on) from each document's prompt."""
        return generate_greedy(
            self.model,
            self.processing_class,
            [doc.prompt for doc in documents],
            self.args.max_new_tokens,
            self.args.per_device_eval_batch_size,
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
        world = self._world()
        rank, size = world
        mine = indices[rank::size]
        generated = gather_lists(list(zip(mine, self.generate_completions([self.documents[i] for i in mine]))), world)
        cache = self.epoch_state.hard_negatives
        for i, generation in sorted(generated):
            doc = self.documents[i]
            negative = self.wrong_generation(doc, generation)
            if negative is None:
                continue
            cache.setdefault(doc.id, []).append(negative)
            if rng.random() < self.args.gamma_diversity:
                texts[i] = negative

    # -- verification head ----------------------------------------------------------------
    def verification_features_of(self, rows: list[dict]) -> torch.Tensor:
        """Verification-head features of encoded rows: each row cut after its ``p`` (the last
        token of its final ``<verified>`` tag), pooled as ``concat(mean of hidden[0..p],
        hidden[p])`` of the final layer, in eval mode. ``[N, 2H]`` float32 on CPU."""
        ids = [list(r["input_ids"][: int(r["verified_position"]) + 1]) for r in rows]
        return prefix_features(
            self.model, ids, self.pad_token_id, batch_size=max(1, self.args.per_device_eval_batch_size)
        )

    def fit_verification_head(
        self, rows: list[dict], seed: int, timing: dict | None = None
    ) -> tuple[SDMHead | None, torch.Tensor]:
        """Fit a verification head on encoded ``rows`` (their ``reward`` is the label): the
        features of :meth:`verification_features_of`, then
        :func:`~sdm_hf.lm.verification.fit_split_head` (a seeded 50/50 split into the head's
        own training and calibration halves) with this trainer's ``head_*`` settings.

        Args:
            rows: :func:`~sdm_hf.lm.encoding.encode_example` rows with ``document_id``.
            seed: seeds the split and the fit.
            timing: when given, receives ``head_features_seconds`` and ``head_fit_seconds``.

        Returns:
            ``(head or None, support_row)`` as :func:`~sdm_hf.lm.verification.fit_split_head`.
        """
        timing = timing if timing is not None else {}
        started = time.perf_counter()
        feats = self.verification_features_of(rows)
        timing["head_features_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        labels = torch.tensor([r["reward"] for r in rows])
        doc_ids = torch.tensor([r["document_id"] for r in rows])
        base_model = getattr(getattr(self.model, "config", None), "_name_or_path", None)
        head, support_row = fit_split_head(feats, labels, doc_ids, self.args, seed, base_model=base_model)
        if head is not None:
            timing["head_fit_seconds"] = time.perf_counter() - started
        return head, support_row

    # -- loss -----------------------------------------------------------------------------
    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        # Overridden: the SDM loss needs beta from the verification head, on features of this
        # very forward pass (a causal LM's prefix states do not depend on what follows, so no
        # second forward), and the metadata columns must not reach the model.
        labels = inputs.pop("labels")
        reward = inputs.pop("reward", None)
        positions = inputs.pop("verified_position", None)
        doc_ids = inputs.pop("document_id", None)
        head = self._loss_head if self.args.use_sdm_loss else None
        keep = {"logits_to_keep": supervised_logit_mask(labels)} if self._lean_logits else {}
        outputs = model(**inputs, output_hidden_states=head is not None, **keep)
        beta = torch.full((labels.shape[0],), math.e, device=outputs.logits.device)
        if head is not None:
            if self.args.disable_dropout or not model.training:
                hidden = outputs.hidden_states[-1].detach()
            else:  # dropout on: the head was fitted on eval-mode features, so take those
                hidden = eval_mode_hidden_states(model, inputs, self._lean_logits)
            feats = pool_verification_states(hidden, positions)
            support = None
            if self._loss_support_row is not None and doc_ids is not None:
                ids = doc_ids.cpu()
                if int(ids.max()) < self._loss_support_row.numel():
                    support = self._loss_support_row[ids]  # the self-excluded view for head-training documents
            out = head.predict(feats.float().cpu(), support_rows=support)
            beta = (2.0 + out.probabilities.gather(1, reward.cpu().view(-1, 1)).squeeze(1)).to(beta.device)
        loss = sdm_next_token_loss(outputs.logits, labels, beta, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(
        self,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        # Overridden: eval_loss is the SDM loss under a head fitted on the evaluation
        # (calibration) documents just before, so it is computed with that head in place of
        # the training one (Schmaltz 2025, SDM language models, Sec. 3.2), and the head's
        # q_min and high-reliability admission are logged with it.
        if eval_dataset is not None:
            raise ValueError("pass the evaluation data to SDMTrainer(eval_dataset=...) so it can be prepared")
        extra: dict[str, float] = {}
        if self.args.use_sdm_loss and self._eval_versions.rows:
            eval_head, eval_support = self.fit_verification_head(
                self._eval_versions.rows, seed=int(self.args.seed) + 77
            )
            saved = (self._loss_head, self._loss_support_row)
            self._loss_head, self._loss_support_row = eval_head, eval_support
            if eval_head is not None:
                admitted = eval_head.calibration_report(alphas=()).rows
                n = sum(r["n"] for r in admitted)
                extra = {
                    f"{metric_key_prefix}_head_q_min": eval_head.q_min if math.isfinite(eval_head.q_min) else -1.0,
                    f"{metric_key_prefix}_head_hr_admission": sum(r["admitted"] for r in admitted) / max(n, 1),
                }
            try:
                metrics = super().evaluate(None, ignore_keys, metric_key_prefix)
            finally:
                self._loss_head, self._loss_support_row = saved
        else:
            metrics = super().evaluate(None, ignore_keys, metric_key_prefix)
        metrics.update(extra)
        if extra:
            self.log(extra)
        return metrics

    # -- saving ---------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None):
        # Overridden: checkpoints and saved models also carry the current verification head and
        # the epoch's SDM state (document versions, hard-negative caches, support rows), so
        # that resume_from_checkpoint continues exactly.
        super()._save(output_dir, state_dict=state_dict)
        folder = Path(output_dir or self.args.output_dir or ".")
        if self.head is not None:
            self.head.save_pretrained(folder / "sdm_head")
        (folder / STATE_NAME).write_text(self.epoch_state.to_json(), encoding="utf-8")

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # Overridden: resuming must also restore what _save added; the epoch being resumed is
        # then already prepared, so its versions and head are not drawn again.
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        folder = Path(resume_from_checkpoint)
        path = folder / STATE_NAME
        if not path.is_file():
            warnings.warn(f"{path} is missing: the SDM state restarts from the next epoch", UserWarning, stacklevel=2)
            return
        state = SDMEpochState.from_json(path.read_text(encoding="utf-8"), source=str(path))
        unknown = sorted({i for i, _, _ in state.versions if i >= len(self.documents)})
        if unknown:
            raise ValueError(
                f"{path}: document id {unknown[0]} is beyond the {len(self.documents)} training documents; "
                "resume with the train_dataset the checkpoint was trained on"
            )
        rows = [self._encode(self.documents[i], text, reward) for i, text, reward in state.versions]
        head_dir = folder / "sdm_head"
        self.head = SDMHead.from_pretrained(head_dir) if (head_dir / "config.json").is_file() else None
        self.epoch_state, self._head_epoch, self._train_versions.rows = state, state.prepared_epoch, rows
        self._loss_head, self._loss_support_row = self.head, state.support_row

    def build_final_head(self, generate: bool = True) -> SDMHead:
        """The test-time verification head, fitted on the evaluation (calibration) documents
        only: every positive, every static negative and, with ``generate``, every wrong greedy
        generation as a further negative (gamma_gen = gamma_diversity = 1); Schmaltz 2025, SDM
        language models, Sec. 3.4. It becomes ``self.head`` (saved by :meth:`save_sdm_model`)."""
        if not self._eval_versions.rows or self.eval_documents is None:
            raise ValueError("build_final_head needs eval_dataset (the calibration set)")
        extra: dict[int, list[str]] = {}
        if generate:
            for doc, generation in zip(self.eval_documents, self.generate_completions(self.eval_documents)):
                negative = self.wrong_generation(doc, generation)
                if negative is not None:
                    extra.setdefault(doc.id, []).append(negative)
        rows = []
        for doc in self.eval_documents:
            rows.append(self._encode(doc, doc.positive, True))
            rows.extend(self._encode(doc, text, False) for text in doc.negatives + extra.get(doc.id, []))
        rows = [dict(row, document_id=i) for i, row in enumerate(rows)]  # each version is its own document
        head, _ = self.fit_verification_head(rows, seed=int(self.args.seed) + 99)
        if head is None:
            raise ValueError("not enough positives and negatives in the evaluation set for a head")
        self.final_head_generated_negatives = sum(len(v) for v in extra.values())
        self.head = head
        return head

    def save_sdm_model(self, output_dir: str | Path) -> Path:
        """Save model, tokenizer and the current head (``sdm_head/``) into ``output_dir``."""
        from ..hub import save_sdm_model

        if self.head is None:
            raise ValueError("no verification head yet: train (use_sdm_loss=True) or call build_final_head()")
        return save_sdm_model(self.model, self.head, output_dir, tokenizer=self.processing_class)
