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
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase, Trainer
from transformers.trainer_utils import HubStrategy

from ..head.modeling import SDMHead
from ..utils.files import atomic_write_text
from .callbacks import HardNegativeCallback, HeadRefreshCallback
from .collator import ContrastiveMaskingCollator
from .control import ControlTokens
from .data import Document, VersionDataset, encode_documents, negative_only_documents, prepare_documents
from .epochs import SDMEpochMixin
from .loss import accepts_logits_to_keep, sdm_next_token_loss, supervised_logit_mask
from .modeling import disable_dropout, eval_mode_hidden_states
from .sdm_config import SDMTrainingArguments
from .state import STATE_NAME, SDMEpochState
from .trainer_card import SDM_SETTINGS, TrainerCardData, sdm_trainer_card
from .verification_features import pool_verification_states

__all__ = ["SDMTrainer", "exact_match_verifier"]

HEAD_SUBFOLDER = "sdm_head"  # the verification head inside checkpoints and output_dir


def exact_match_verifier(positive: str, generation: str) -> bool:
    """Default verifier ``r``: exact match after stripping outer whitespace (both texts have
    their control suffixes removed before they get here)."""
    return positive.strip() == generation.strip()


class SDMTrainer(SDMEpochMixin, Trainer):
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
        self.documents, aside = prepare_documents(train_dataset, self.control_tokens, append_control)
        # prompts without a positive: verification-head data only (ids after the documents')
        self.negative_only_documents = negative_only_documents(aside, len(self.documents))
        if not self.documents:
            raise ValueError(
                "train_dataset has no trainable document (it is empty, or no prompt has a positive completion)"
            )
        self._append_control = append_control
        # evaluation sets by name ("" for a single one); the first is the calibration set
        named = (
            eval_dataset if isinstance(eval_dataset, dict) else {"": eval_dataset} if eval_dataset is not None else {}
        )
        if isinstance(eval_dataset, dict) and not eval_dataset:
            raise ValueError("eval_dataset is an empty dict: pass None or {name: dataset, ...}")
        prepared = {
            str(name): prepare_documents(data, self.control_tokens, append_control) for name, data in named.items()
        }
        self.eval_sets: dict[str, list[Document]] = {name: docs for name, (docs, _) in prepared.items()}
        first = next(iter(prepared.values()), ([], []))
        self.eval_negative_only_documents = negative_only_documents(first[1], len(first[0]))
        empty = [name or "eval_dataset" for name, docs in self.eval_sets.items() if not docs]
        if empty:
            raise ValueError(f"evaluation set {empty[0]!r} has no document with a positive completion")
        self.eval_documents: list[Document] | None = next(iter(self.eval_sets.values()), None)
        # every static version tokenized once (datasets.map); generated hard negatives join later
        self._encoded: dict[tuple[int, str], dict] = encode_documents(
            processing_class, self.documents + self.negative_only_documents + self.eval_negative_only_documents
            + [d for docs in self.eval_sets.values() for d in docs],
            self.control_tokens, args.max_length, num_proc=args.dataset_num_proc,
        )  # fmt: skip
        self.epoch_state = SDMEpochState()
        self._head_epoch: int | None = None
        self._logged_epochs: set[int] = set()
        self.head: SDMHead | None = None
        # what compute_loss uses: the epoch's head, or the evaluation head while evaluating
        self._loss_head: SDMHead | None = None
        self._loss_support_row: torch.Tensor | None = None
        self.epoch_log: list[dict] = []
        self._train_versions = VersionDataset()
        self._eval_version_sets = {name: VersionDataset() for name in self.eval_sets}
        self._eval_versions = next(iter(self._eval_version_sets.values()), VersionDataset())
        super().__init__(
            model=model,
            args=args,
            train_dataset=self._train_versions,
            eval_dataset=None
            if not self.eval_sets
            else self._eval_versions
            if "" in self.eval_sets
            else dict(self._eval_version_sets),
            processing_class=processing_class,
            data_collator=ContrastiveMaskingCollator(pad_token_id=processing_class.pad_token_id),
            **kwargs,
        )
        # compute_loss takes the accumulated batch's token count; this makes the Trainer pass it
        self.model_accepts_loss_kwargs = True
        self._lean_logits = bool(args.lean_logits) and accepts_logits_to_keep(model)
        if args.disable_dropout:
            disable_dropout(model)
        if args.hard_negative_timing == "in_epoch" and (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            raise ValueError(
                "hard_negative_timing='in_epoch' generates for each process's own batch, which FSDP / DeepSpeed "
                "cannot run (every process must join each forward); use hard_negative_timing='epoch_start'"
            )
        self.add_callback(HardNegativeCallback(self))
        self.add_callback(HeadRefreshCallback(self))
        self.start_epoch(0)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        # Overridden: with hard_negative_timing="in_epoch" the batch's scheduled documents are
        # generated for with the current weights first, and their wrong generations may replace
        # their static negatives in this batch (SDMEpochMixin.generate_in_batch).
        if self.epoch_state.pending_generation and "document_id" in inputs:
            inputs = self.generate_in_batch(inputs)
        return super().training_step(model, inputs, num_items_in_batch)

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
                hidden = outputs.hidden_states[self.args.verification_layer].detach()
            else:  # dropout on: the head was fitted on eval-mode features, so take those
                hidden = eval_mode_hidden_states(model, inputs, self._lean_logits, self.args.verification_layer)
            feats = pool_verification_states(hidden, positions, self.args.verification_pooling)
            support = None
            if self._loss_support_row is not None and doc_ids is not None:
                ids = doc_ids.cpu()
                if int(ids.max()) < self._loss_support_row.numel():
                    support = self._loss_support_row[ids]  # the self-excluded view for head-training documents
            out = head.predict(feats.float().cpu(), support_rows=support)
            beta = (2.0 + out.probabilities.gather(1, reward.cpu().view(-1, 1)).squeeze(1)).to(beta.device)
        loss = sdm_next_token_loss(outputs.logits, labels, beta, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch is then the token count summed over every process, and the
            # gradients are averaged over processes: scaled as the Trainer scales its own loss,
            # the step equals that of one process over the same global batch
            loss = loss * (
                self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu
            )
        return (loss, outputs) if return_outputs else loss

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(
        self,
        eval_dataset: Dataset | dict[str, Dataset] | str | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        # Overridden: eval_loss is the SDM loss under a head fitted on the evaluation
        # (calibration) documents just before, so it is computed with that head in place of
        # the training one (Schmaltz 2025, SDM language models, Sec. 3.2), and the head's
        # q_min and high-reliability admission are logged with it. ``eval_dataset`` may be a
        # preference dataset (prepared here, its versions seeded like the constructor's), a
        # dict of them or None (the constructor's sets); with several sets every metric is
        # prefixed ``{metric_key_prefix}_{name}``, as the Trainer does.
        if isinstance(eval_dataset, dict) or (eval_dataset is None and self.eval_sets and "" not in self.eval_sets):
            sets = eval_dataset if isinstance(eval_dataset, dict) else {name: name for name in self.eval_sets}
            metrics: dict[str, float] = {}
            for name, data in sets.items():
                metrics.update(self.evaluate(data, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        if isinstance(eval_dataset, str):  # a name: the Trainer's own loop over the constructor's dict
            if eval_dataset not in self._eval_version_sets:
                raise ValueError(f"no evaluation set named {eval_dataset!r}; known: {sorted(self._eval_version_sets)}")
            versions = self._eval_version_sets[eval_dataset]
        elif eval_dataset is None or isinstance(eval_dataset, VersionDataset):
            versions = eval_dataset or self._eval_versions
        else:
            documents, _ = prepare_documents(eval_dataset, self.control_tokens, self._append_control)
            if not documents:
                raise ValueError("eval_dataset has no document with a positive completion to evaluate on")
            encoded = encode_documents(self.processing_class, documents, self.control_tokens, self.args.max_length)
            versions = VersionDataset()
            versions.rows = self.evaluation_rows(documents, encoded)
        return self._evaluate_versions(versions, ignore_keys, metric_key_prefix)

    def _evaluate_versions(
        self, versions: VersionDataset, ignore_keys: list[str] | None, metric_key_prefix: str
    ) -> dict[str, float]:
        if not versions.rows:  # no evaluation set: the Trainer's own error
            return super().evaluate(None, ignore_keys, metric_key_prefix)
        extra: dict[str, float] = {}
        saved = (self._loss_head, self._loss_support_row)
        if self.args.use_sdm_loss:
            timing: dict[str, float] = {}  # the main process's head figures, the same on every process
            eval_head, eval_support = self.fit_shared_head(versions.rows, seed=int(self.args.seed) + 77, timing=timing)
            self._loss_head, self._loss_support_row = eval_head, eval_support
            figures = {k: v for k, v in timing.items() if k.startswith("head_") and not k.endswith("_seconds")}
            extra = {f"{metric_key_prefix}_{k}": v for k, v in figures.items()}
        try:
            metrics = super().evaluate(versions, ignore_keys, metric_key_prefix)
        finally:
            self._loss_head, self._loss_support_row = saved
        metrics.update(extra)
        if extra:
            self.log(extra)
        return metrics

    # -- saving, loading and the Hub -------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None):
        # Overridden: checkpoints and saved models also carry the current verification head and
        # the epoch's SDM state (document versions, hard-negative caches, support rows), so
        # that resume_from_checkpoint continues exactly. The state file holds no training text
        # (references into the training documents) and its name keeps it out of the Trainer's
        # output_dir pushes (sdm_hf.lm.state).
        super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:  # transformers calls _save on every process; one writes
            return
        folder = Path(output_dir or self.args.output_dir or ".")
        if self.head is not None:  # its card names the repository it will be pushed to, not this folder
            hint = self.args.hub_model_id or Path(self.args.output_dir or folder).name
            self.head.save_pretrained(folder / HEAD_SUBFOLDER, model_card_kwargs={"repo_hint": hint})
        elif (folder / HEAD_SUBFOLDER / "model.safetensors").is_file():
            shutil.rmtree(folder / HEAD_SUBFOLDER)  # an earlier head does not belong to these weights
        atomic_write_text(folder / STATE_NAME, self.epoch_state.to_json(self.documents))  # old or new, never half

    def _save_checkpoint(self, model, trial):
        # Overridden: with hard_negative_timing="in_epoch" each process generated for its own
        # batches; their caches and what is still to generate are merged first (every process
        # comes here), so the checkpoint's state is the run's, not only the main process's.
        self.sync_in_epoch_state()
        return super()._save_checkpoint(model, trial)

    def _read_epoch_state(self, folder: Path) -> SDMEpochState | None:
        """The SDM state of checkpoint ``folder``, or None without one."""
        path = Path(folder) / STATE_NAME
        if not path.is_file():
            return None
        state = SDMEpochState.from_json(path.read_text(encoding="utf-8"), source=str(path), documents=self.documents)
        unknown = sorted({i for i, _, _ in state.versions if i >= len(self.documents)})
        if unknown:
            raise ValueError(
                f"{path}: document id {unknown[0]} is beyond the {len(self.documents)} training documents; "
                "resume with the train_dataset the checkpoint was trained on"
            )
        return state

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # Overridden: resuming must also restore what _save added; the epoch being resumed is
        # then already prepared, so its versions and head are not drawn again.
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        folder = Path(resume_from_checkpoint)
        state = self._read_epoch_state(folder)
        if state is None:
            warnings.warn(
                f"{folder / STATE_NAME} is missing: the SDM state restarts from the next epoch",
                UserWarning,
                stacklevel=2,
            )
            return
        rows = [self._encode(self.documents[i], text, reward) for i, text, reward in state.versions]
        head_dir = folder / HEAD_SUBFOLDER
        self.head = SDMHead.from_pretrained(head_dir) if (head_dir / "config.json").is_file() else None
        self.epoch_state, self._head_epoch, self._train_versions.rows = state, state.prepared_epoch, rows
        self._loss_head, self._loss_support_row = self.head, state.support_row

    def _load_best_model(self) -> None:
        # Overridden: the Trainer restores the best checkpoint's weights only; the head saved
        # with them (and the support rows that map the training documents onto it) come from
        # the same checkpoint, so the restored model and head belong together.
        super()._load_best_model()
        if self.state.best_model_checkpoint is None:
            return
        folder = Path(self.state.best_model_checkpoint)
        state = self._read_epoch_state(folder)
        support = None if state is None else state.support_row
        if (folder / HEAD_SUBFOLDER / "config.json").is_file():
            self.head = SDMHead.from_pretrained(folder / HEAD_SUBFOLDER)
        else:
            if self.head is not None or self.args.use_sdm_loss:
                warnings.warn(
                    f"the best checkpoint {folder} has no {HEAD_SUBFOLDER}/: the restored model has no verification "
                    "head (the last epoch's belongs to other weights); call build_final_head() before saving",
                    UserWarning,
                    stacklevel=2,
                )
            self.head, support = None, None
        self.epoch_state.support_row = support
        self._loss_head, self._loss_support_row = self.head, support

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # Overridden: the Trainer copies only the modeling files from the checkpoint into
        # output_dir and starts uploading it at once (in the background), so the checkpoint's
        # head is copied in first: the pushed model and head belong together. Checkpoint pushes
        # (hub_strategy "checkpoint"/"all_checkpoints") carry the whole folder, head and SDM
        # state included; that file holds no training text (sdm_hf.lm.state).
        busy = self.push_in_progress is not None and not self.push_in_progress.is_done()
        pushes = self.args.hub_strategy != HubStrategy.END and (self.args.hub_always_push or not busy)
        if self.is_world_process_zero() and pushes:
            output_dir = Path(self.args.output_dir or ".")
            copy_head(Path(checkpoint_folder) / HEAD_SUBFOLDER, output_dir / HEAD_SUBFOLDER)
        super()._push_from_checkpoint(checkpoint_folder)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        # Overridden: transformers' card (its metadata, hyperparameters and results) is written
        # first, then the SDM part is merged in (sdm_hf.lm.trainer_card): tags, the head's
        # calibration results, and a section with the promise, base model, data format, SDM
        # settings and the head's calibration facts. push_to_hub calls this before uploading.
        super().create_model_card(
            language=language,
            license=license,
            tags=tags,
            model_name=model_name,
            finetuned_from=finetuned_from,
            tasks=tasks,
            dataset_tags=dataset_tags,
            dataset=dataset,
            dataset_args=dataset_args,
        )
        if not self.is_world_process_zero():
            return
        path = Path(self.args.output_dir or ".") / "README.md"
        existing = ModelCard.load(path) if path.is_file() else None
        base = (existing.data.get("base_model") if existing is not None else None) or finetuned_from
        base = ", ".join(base) if isinstance(base, list) else base  # the metadata allows a list
        settings = {name: getattr(self.args, name) for name in SDM_SETTINGS if hasattr(self.args, name)}
        if hasattr(self.args, "head_fit_settings"):  # the values the head fits used, None resolved
            resolved = self.args.head_fit_settings()
            settings.update({f"head_{k}": resolved[k] for k in ("epochs", "learning_rate") if f"head_{k}" in settings})
        data = TrainerCardData(
            base_model=base or getattr(getattr(self.model, "config", None), "_name_or_path", None) or None,
            alpha=float(self.args.alpha),
            control=self.control_tokens,
            train_documents=len(self.documents),
            eval_documents=None if self.eval_documents is None else len(self.eval_documents),
            settings=settings,
        )
        repo_hint = self.hub_model_id or self.args.hub_model_id or model_name or Path(path.parent).absolute().name
        card = sdm_trainer_card(existing, data, self.head, repo_hint=str(repo_hint), subfolder=HEAD_SUBFOLDER)
        card.save(path)

    def save_sdm_model(self, output_dir: str | Path) -> Path:
        """Save model, tokenizer and the current head (``sdm_head/``) into ``output_dir``."""
        from ..repository import save_sdm_model

        if self.head is None:
            raise ValueError("no verification head yet: train (use_sdm_loss=True) or call build_final_head()")
        if self.args.should_save:  # with several processes one writes; the others wait for it
            save_sdm_model(self.model, self.head, output_dir, tokenizer=self.processing_class)
        self.accelerator.wait_for_everyone()
        return Path(output_dir)


def copy_head(source: Path, target: Path) -> None:
    """Make ``target`` a copy of the head folder ``source`` (removed when ``source`` has no head):
    copied beside it under a ``_`` name (which the Trainer's pushes skip), then renamed in."""
    incoming = target.parent / f"_{target.name}.incoming"
    shutil.rmtree(incoming, ignore_errors=True)
    if (source / "config.json").is_file():
        shutil.copytree(source, incoming)
    shutil.rmtree(target, ignore_errors=True)
    if incoming.is_dir():
        incoming.rename(target)
