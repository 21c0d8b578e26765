"""``SDMTrainer``: fine-tune a causal LM with the SDM next-token loss (SPEC B2-B5).

A ``transformers.Trainer`` subclass that overrides only what it must:

* ``compute_loss`` — the change-of-base loss with ``beta_n = 2 + sdm(z')_{y_n}`` from the
  verification head, on features taken from the SAME forward pass (hidden states up to the
  last ``<verified>`` of each row, detached); ``use_sdm_loss=False`` is plain cross-entropy
  over the same contrastive masks (the paper's baseline).
* ``evaluate`` — fits a separate head on the evaluation set first, so ``eval_loss`` is the
  SDM loss (seeded document versions: comparable across evaluations) and
  ``load_best_model_at_end`` / ``metric_for_best_model="eval_loss"`` work.
* ``_save`` — checkpoints also carry the current verification head (``sdm_head/``).

Every epoch starts (callback, including before the first step) by drawing each document's
version (positive with probability ``gamma_pos``, else a negative), generating hard
negatives from ``hard_negatives_from_epoch`` on (SPEC B4), and refitting the verification
head on the documents split 50/50 (seeded per epoch).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback

from ..features import pool_hidden_states
from ..fit import fit_sdm_head
from ..head import SDMConfig, SDMHead
from .collator import ContrastiveMaskingCollator
from .data import Document, prepare_documents
from .encoding import ControlTokens, encode_example, generate_greedy, prefix_features
from .loss import sdm_next_token_loss
from .sdm_config import SDMTrainingArguments

__all__ = ["SDMTrainer", "exact_match_verifier"]

_STATE_NAME = "sdm_trainer_state.json"


def exact_match_verifier(positive: str, generation: str) -> bool:
    """Default verifier r: exact match after stripping outer whitespace (suffixes removed)."""
    return positive.strip() == generation.strip()


class _VersionDataset(Dataset):
    """The encoded version of each document for the current epoch (a map-style dataset)."""

    def __init__(self):
        self.rows: list[dict] = []

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


class _EpochStart(TrainerCallback):
    """Calls the trainer's epoch preparation; callbacks do not receive the trainer, so it is
    passed to the constructor (as TRL does)."""

    def __init__(self, trainer: SDMTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.trainer.start_epoch(int(math.floor((state.epoch or 0.0) + 1e-6)))


class SDMTrainer(Trainer):
    """Trainer for SDM language models.

    Args:
        model: a causal LM (optionally PEFT-wrapped).
        args: :class:`SDMTrainingArguments`.
        train_dataset: a TRL preference dataset (paired or unpaired; see ``sdm_hf.lm.data``).
        eval_dataset: the same format; its verification head is fitted at every evaluation.
        processing_class: the tokenizer.
        control_tokens: the control strings (default ``<verified>Yes/No</verified>``).
        verifier: ``r(positive, generation) -> bool`` on suffix-stripped content
            (default: exact match after stripping outer whitespace).
        append_control: add missing control suffixes (True) or reject such rows.

    After construction and at every epoch start, ``epoch_log`` gains one dict: ``epoch``,
    ``generated`` (hard-negative generations), ``hard_negatives`` (wrong ones cached), and
    ``generation_seconds``, ``head_features_seconds`` (the feature pass of the head refresh)
    and ``head_fit_seconds``.

    Example::

        args = SDMTrainingArguments(output_dir="out", num_train_epochs=3, per_device_train_batch_size=8,
                                    head_epochs=50, eval_strategy="epoch", save_strategy="epoch",
                                    load_best_model_at_end=True, metric_for_best_model="eval_loss")
        trainer = SDMTrainer(model=model, args=args, train_dataset=train, eval_dataset=calib,
                             processing_class=tokenizer)
        trainer.train()
        trainer.build_final_head()           # SPEC B5: test-time head on the calibration set
        trainer.save_sdm_model("out/final")  # model + tokenizer + sdm_head/
    """

    loss_is_scaled_for_ga = True  # compute_loss divides by the accumulated batch's token count

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
        if not isinstance(args, SDMTrainingArguments):
            raise TypeError("args must be SDMTrainingArguments")
        if processing_class is None:
            raise ValueError("SDMTrainer needs the tokenizer as processing_class")
        if train_dataset is None:
            raise ValueError("SDMTrainer needs a train_dataset in TRL preference format")
        tokenizer = processing_class
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.control_tokens = control_tokens or ControlTokens()
        self.verifier = verifier or exact_match_verifier
        self.documents, _ = prepare_documents(train_dataset, self.control_tokens, append_control)
        self.eval_documents = None
        if eval_dataset is not None:
            self.eval_documents, _ = prepare_documents(eval_dataset, self.control_tokens, append_control)
        self._tokenizer = tokenizer
        self._encoded: dict[tuple[int, str], dict] = {}
        self.hard_negatives: dict[int, list[str]] = {}  # this epoch's wrong generations, per document
        self._previous_hard_negatives: dict[int, list[str]] = {}
        self.head: SDMHead | None = None
        self._active_head: SDMHead | None = None
        self._support_row: torch.Tensor | None = None
        self.epoch_log: list[dict] = []
        self._train_versions = _VersionDataset()
        self._eval_versions = _VersionDataset()
        super().__init__(
            model=model,
            args=args,
            train_dataset=self._train_versions,
            eval_dataset=self._eval_versions if eval_dataset is not None else None,
            processing_class=tokenizer,
            data_collator=ContrastiveMaskingCollator(pad_token_id=tokenizer.pad_token_id),
            **kwargs,
        )
        # our compute_loss takes the accumulated batch's token count; make the Trainer pass it
        self.model_accepts_loss_kwargs = True
        if args.disable_dropout:
            for module in self.model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
                for name in ("attention_dropout", "dropout", "hidden_dropout"):
                    if isinstance(getattr(module, name, None), float):
                        setattr(module, name, 0.0)
        self.add_callback(_EpochStart(self))
        self.start_epoch(0)  # datasets must be non-empty before the Trainer sizes its loader

    # -- several processes (accelerate / torchrun) ---------------------------------------------
    def _world(self) -> tuple[int, int]:
        """``(rank, world_size)`` of this process."""
        state = getattr(self, "accelerator", None)
        if state is None or getattr(state, "num_processes", 1) <= 1:
            return 0, 1
        return int(state.process_index), int(state.num_processes)

    def _gather(self, local: list) -> list:
        """Every process's ``local`` list, concatenated in rank order."""
        rank, world = self._world()
        if world == 1:
            return list(local)
        parts = [None] * world
        torch.distributed.all_gather_object(parts, local)
        return [item for part in parts for item in part]

    def _broadcast_head(self, head: SDMHead | None, support_row: torch.Tensor):
        """The main process's head (rebuilt from its safe arrays) on every process."""
        from .. import persistence

        rank, world = self._world()
        if world == 1:
            return head, support_row
        payload = [None]
        if rank == 0:
            payload = [None if head is None else (*persistence.state_to_files(head)[:2], support_row.tolist())]
        torch.distributed.broadcast_object_list(payload, src=0)
        if payload[0] is None:
            return None, support_row
        config, tensors, rows = payload[0]
        names = {name: f"<broadcast {name}>" for name in (persistence.CONFIG_NAME, persistence.WEIGHTS_NAME)}
        head = persistence.head_from_files(SDMHead, config, tensors, None, names, torch.device("cpu"))
        head.compute_training_distance_lists()
        return head, torch.tensor(rows, dtype=torch.long)

    # -- documents and versions -----------------------------------------------------------
    def _encode(self, doc: Document, text: str, positive: bool) -> dict:
        key = (doc.id, text)
        if key not in self._encoded:
            row = encode_example(
                self._tokenizer, doc.prompt, text, positive, self.control_tokens, max_length=self.args.max_length
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
        """Draw this epoch's versions, generate hard negatives, refresh the head (SPEC B2/B4)."""
        if getattr(self, "_prepared_epoch", None) == epoch:
            return
        self._prepared_epoch = epoch
        args = self.args
        rng = np.random.default_rng([args.seed, epoch, 1])
        self._previous_hard_negatives, self.hard_negatives = self.hard_negatives, {}
        # the LM's versions: positive with gamma_pos, else a static negative
        texts, rewards = self._draw_versions(self.documents, rng, lambda d: d.negatives)
        generate = [
            i
            for i, positive in enumerate(rewards)
            if not positive and epoch >= args.hard_negatives_from_epoch and rng.random() < args.gamma_gen
        ]
        timing = {"generation_seconds": 0.0, "head_features_seconds": 0.0, "head_fit_seconds": 0.0}
        started = time.perf_counter()
        if generate:
            self._hard_negatives(generate, texts, rng)
        timing["generation_seconds"] = time.perf_counter() - started
        self._train_versions.rows = [
            self._encode(doc, text, positive) for doc, text, positive in zip(self.documents, texts, rewards)
        ]
        if self.eval_documents is not None and not self._eval_versions.rows:
            eval_rng = np.random.default_rng([args.seed, 2])  # the same versions at every evaluation
            e_texts, e_rewards = self._draw_versions(self.eval_documents, eval_rng, lambda d: d.negatives)
            self._eval_versions.rows = [
                self._encode(d, t, r) for d, t, r in zip(self.eval_documents, e_texts, e_rewards)
            ]
        if args.use_sdm_loss:
            head_rng = np.random.default_rng([args.seed, epoch, 3])
            h_texts, h_rewards = self._draw_versions(
                self.documents, head_rng, lambda d: d.negatives + self._previous_hard_negatives.get(d.id, [])
            )
            rows = [self._encode(d, t, r) for d, t, r in zip(self.documents, h_texts, h_rewards)]
            head, support_row = (None, torch.full((len(self.documents),), -1, dtype=torch.long))
            if self._world()[0] == 0:  # trained once, on the main process, then broadcast
                head, support_row = self._fit_head(rows, seed=int(args.seed) * 1000 + epoch, timing=timing)
            self.head, self._support_row = self._broadcast_head(head, support_row)
            self._active_head = self.head
        self.epoch_log.append(
            {
                "epoch": epoch,
                "generated": len(generate),
                "hard_negatives": sum(len(v) for v in self.hard_negatives.values()),
                **timing,
            }
        )

    def generate_completions(self, documents: list[Document]) -> list[str]:
        """Greedy, batched, left-padded generation (KV cache on) from each document's prompt."""
        return generate_greedy(
            self.model,
            self._tokenizer,
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

    def _hard_negatives(self, indices: list[int], texts: list[str], rng) -> None:
        """SPEC B4 for the documents at ``indices`` (all on the negative branch). With several
        processes each generates for its share and the results are merged, in document order,
        on every process (so the caches agree)."""
        rank, world = self._world()
        mine = indices[rank::world]
        generated = self._gather(list(zip(mine, self.generate_completions([self.documents[i] for i in mine]))))
        for i, generation in sorted(generated):
            doc = self.documents[i]
            negative = self.wrong_generation(doc, generation)
            if negative is None:
                continue
            self.hard_negatives.setdefault(doc.id, []).append(negative)
            if rng.random() < self.args.gamma_diversity:
                texts[i] = negative

    # -- verification head ----------------------------------------------------------------
    def verification_features_of(self, rows: list[dict]) -> torch.Tensor:
        """SPEC B2 features of encoded rows (eval mode, each row cut after its ``p``)."""
        ids = [list(r["input_ids"][: int(r["verified_position"]) + 1]) for r in rows]
        return prefix_features(
            self.model, ids, self._tokenizer.pad_token_id, batch_size=max(1, self.args.per_device_eval_batch_size)
        )

    @staticmethod
    def _pool(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``concat(mean of hidden[0..p], hidden[p])`` per row; ``[B, T, H]`` -> ``[B, 2H]``."""
        steps = torch.arange(hidden.shape[1], device=hidden.device).view(1, -1)
        return pool_hidden_states(hidden, (steps <= positions.view(-1, 1)).long(), "mean_last")

    def _fit_head(self, rows: list[dict], seed: int, timing: dict | None = None) -> tuple[SDMHead | None, torch.Tensor]:
        """Fit a verification head on ``rows`` split 50/50 (seeded); returns the head and the
        support row of every document id (-1 for documents in the calibration half).
        ``timing`` (optional) receives ``head_features_seconds`` and ``head_fit_seconds``."""
        timing = timing if timing is not None else {}
        started = time.perf_counter()
        feats = self.verification_features_of(rows)
        timing["head_features_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        labels = torch.tensor([r["reward"] for r in rows])
        doc_ids = torch.tensor([r["document_id"] for r in rows])
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
        half = len(rows) // 2
        train_idx, calib_idx = perm[:half], perm[half:]
        support_row = torch.full((int(doc_ids.max()) + 1,), -1, dtype=torch.long)
        counts = [torch.bincount(labels[part], minlength=2) for part in (train_idx, calib_idx)]
        if any(int(c.min()) < 2 for c in counts):
            warnings.warn(
                "too few positives or negatives to fit a verification head this epoch: beta = e",
                UserWarning,
                stacklevel=2,
            )
            return None, support_row
        config = SDMConfig(
            input_dim=feats.shape[1],
            num_classes=2,
            exemplar_dim=self.args.head_exemplar_dim,
            alpha=self.args.alpha,
            id2label={0: "No", 1: "Yes"},
            feature_pooling="verification",
            base_model=getattr(getattr(self.model, "config", None), "_name_or_path", None),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an empty HR region is normal early in training
            head = fit_sdm_head(
                feats[train_idx],
                labels[train_idx],
                feats[calib_idx],
                labels[calib_idx],
                config,
                epochs=self.args.head_epochs,
                shuffles=self.args.head_shuffles,
                batch_size=self.args.head_batch_size,
                learning_rate=self.args.head_learning_rate,
                resplit=False,
                seed=seed,
                progress=False,
            )
        support_row[doc_ids[train_idx]] = torch.arange(half)
        head.compute_training_distance_lists()
        timing["head_fit_seconds"] = time.perf_counter() - started
        return head, support_row

    # -- loss -----------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Overridden: the SDM loss needs beta from the verification head, on features of
        # this very forward pass (no second forward, SPEC B2 "Cost").
        labels = inputs.pop("labels")
        reward = inputs.pop("reward", None)
        positions = inputs.pop("verified_position", None)
        doc_ids = inputs.pop("document_id", None)
        head = self._active_head if self.args.use_sdm_loss else None
        outputs = model(**inputs, output_hidden_states=head is not None)
        beta = torch.full((labels.shape[0],), math.e, device=outputs.logits.device)
        if head is not None:
            if self.args.disable_dropout or not model.training:
                hidden = outputs.hidden_states[-1].detach()
            else:  # dropout on: features from a separate eval-mode forward
                hidden = self._eval_hidden(model, inputs)
            feats = self._pool(hidden, positions.to(hidden.device))
            support = None
            if self._support_row is not None and doc_ids is not None:
                ids = doc_ids.cpu()
                if int(ids.max()) < self._support_row.numel():
                    support = self._support_row[ids]  # the self-excluded view for head-training documents
            out = head.predict(feats.cpu(), support_rows=support)
            beta = (2.0 + out.probabilities.gather(1, reward.cpu().view(-1, 1)).squeeze(1)).to(beta.device)
        loss = sdm_next_token_loss(outputs.logits, labels, beta, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _eval_hidden(self, model, inputs):
        model.eval()
        try:
            return model(**inputs, output_hidden_states=True).hidden_states[-1]
        finally:
            model.train()

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        # Overridden: fit the evaluation head on the evaluation documents first (SPEC B5).
        if eval_dataset is not None:
            raise ValueError("pass the evaluation data to SDMTrainer(eval_dataset=...) so it can be prepared")
        extra = {}
        if self.args.use_sdm_loss and self._eval_versions.rows:
            eval_head, eval_support = self._fit_head(self._eval_versions.rows, seed=int(self.args.seed) + 77)
            saved = (self._active_head, self._support_row)
            self._active_head, self._support_row = eval_head, eval_support
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
                self._active_head, self._support_row = saved
        else:
            metrics = super().evaluate(None, ignore_keys, metric_key_prefix)
        metrics.update(extra)
        if extra:
            self.log(extra)
        return metrics

    # -- saving ---------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None):
        # Overridden: checkpoints and saved models also carry the current verification head and
        # the epoch's SDM state (document versions, hard-negative caches), so that
        # resume_from_checkpoint continues exactly.
        super()._save(output_dir, state_dict=state_dict)
        folder = Path(output_dir or self.args.output_dir)
        if self.head is not None:
            self.head.save_pretrained(folder / "sdm_head")
        state = {
            "format": 1,
            "prepared_epoch": getattr(self, "_prepared_epoch", None),
            "versions": [[r["document_id"], r["text"], bool(r["reward"])] for r in self._train_versions.rows],
            "hard_negatives": {str(k): v for k, v in self.hard_negatives.items()},
            "previous_hard_negatives": {str(k): v for k, v in self._previous_hard_negatives.items()},
            "support_row": None if self._support_row is None else self._support_row.tolist(),
        }
        (folder / _STATE_NAME).write_text(json.dumps(state, allow_nan=False), encoding="utf-8")

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # Overridden: also restore the verification head and the SDM state saved by _save.
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        folder = Path(resume_from_checkpoint)
        path = folder / _STATE_NAME
        if not path.is_file():
            warnings.warn(f"{path} is missing: the SDM state restarts from the next epoch", UserWarning, stacklevel=2)
            return
        state = json.loads(path.read_text(encoding="utf-8"))
        self._prepared_epoch = state["prepared_epoch"]
        self.hard_negatives = {int(k): v for k, v in state["hard_negatives"].items()}
        self._previous_hard_negatives = {int(k): v for k, v in state["previous_hard_negatives"].items()}
        self._train_versions.rows = [
            self._encode(self.documents[doc_id], text, reward) for doc_id, text, reward in state["versions"]
        ]
        if (folder / "sdm_head" / "config.json").is_file():
            self.head = SDMHead.from_pretrained(folder / "sdm_head")
            self._active_head = self.head
            self._support_row = torch.tensor(state["support_row"], dtype=torch.long)

    def build_final_head(self, generate: bool = True) -> SDMHead:
        """The test-time verification head (SPEC B5), fitted on the evaluation (calibration)
        documents only: every positive, every static negative and, with ``generate``, every
        wrong greedy generation as a further negative (gamma_gen = gamma_diversity = 1).
        It becomes ``self.head`` (saved by :meth:`save_sdm_model`)."""
        if not self._eval_versions.rows:
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
        head, _ = self._fit_head(rows, seed=int(self.args.seed) + 99)
        if head is None:
            raise ValueError("not enough positives and negatives in the evaluation set for a head")
        self.final_head_generated_negatives = sum(len(v) for v in extra.values())
        self.head = head
        return head

    def save_sdm_model(self, output_dir) -> Path:
        """Save model, tokenizer and the current head (``sdm_head/``) into ``output_dir``."""
        from ..hub import save_sdm_model

        if self.head is None:
            raise ValueError("no verification head yet: train (use_sdm_loss=True) or call build_final_head()")
        return save_sdm_model(self.model, self.head, output_dir, tokenizer=self._tokenizer)
