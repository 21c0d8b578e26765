"""``SDMTrainer``: fine-tune a causal LM with the SDM next-token loss (Schmaltz 2025,
*Similarity-Distance-Magnitude Language Models*, arXiv:2510.26183, Sec. 3).

A ``transformers.Trainer`` that overrides only what it must: ``compute_loss`` (the change-of-base
loss with ``beta_n = 2 + sdm(z')_{y_n}`` from the verification head, on hidden states of the same
forward), ``evaluate`` (``eval_loss`` is the SDM loss under a head fitted on the evaluation set, so
``load_best_model_at_end`` picks the checkpoint as the paper does), and saving / loading / pushing
(checkpoints carry the verification head and the epoch's :class:`~sdm_hf.lm.state.SDMEpochState`).
The epoch steps live in :class:`~sdm_hf.lm.epochs.SDMEpochs`, driven by :mod:`sdm_hf.lm.callbacks`.
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
from ..utils.distributed import process_world
from ..utils.files import atomic_write_text
from ..utils.logging import get_logger
from .callbacks import HardNegativeCallback, HeadRefreshCallback
from .collator import ContrastiveMaskingCollator
from .control import ControlTokens
from .data import Document, VersionDataset, encode_documents, prepare_documents
from .epochs import SDMEpochs
from .loss import accepts_logits_to_keep, sdm_next_token_loss, supervised_logit_mask
from .modeling import disable_dropout, eval_mode_hidden_states
from .sdm_config import SDMTrainingArguments
from .state import STATE_NAME, SDMEpochState
from .trainer_card import SDM_SETTINGS, TrainerCardData, sdm_trainer_card
from .verification_features import pool_verification_states

logger = get_logger(__name__)

__all__ = ["SDMTrainer", "exact_match_verifier"]

HEAD_SUBFOLDER = "sdm_head"  # the verification head inside checkpoints and output_dir


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

    The SDM side of the run (documents, versions, hard negatives, heads) is ``trainer.epochs``
    (:class:`~sdm_hf.lm.epochs.SDMEpochs`), which the epoch callbacks are given. After
    construction and at every epoch start, ``epoch_log`` gains one dict: ``epoch``,
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
        self._append_control = append_control
        self.epochs = SDMEpochs.from_datasets(
            args,
            processing_class,
            train_dataset,
            eval_dataset,
            control_tokens=control_tokens or ControlTokens(),
            verifier=verifier or exact_match_verifier,
            append_control=append_control,
            model=lambda: self.model,
            world=lambda: process_world(getattr(self, "accelerator", None)),
            collate=lambda rows: self.data_collator(rows),
            log=lambda logs: self.log(logs),
        )
        epochs = self.epochs
        super().__init__(
            model=model,
            args=args,
            train_dataset=epochs.train_versions,
            eval_dataset=None
            if not epochs.eval_sets
            else epochs.eval_versions
            if "" in epochs.eval_sets
            else dict(epochs.eval_version_sets),
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
        self.add_callback(HardNegativeCallback(epochs))
        self.add_callback(HeadRefreshCallback(epochs))
        epochs.start_epoch(0)

    # -- the SDM side of the run, for users of the trainer (trainer.epochs holds it) ---------------
    @property
    def head(self) -> SDMHead | None:
        """The current verification head: the epoch's, the best checkpoint's, or :meth:`build_final_head`'s."""
        return self.epochs.head

    @head.setter
    def head(self, head: SDMHead | None) -> None:
        self.epochs.head = head

    @property
    def epoch_state(self) -> SDMEpochState:
        """The epoch's versions, hard-negative caches and support rows (what checkpoints add)."""
        return self.epochs.epoch_state

    @property
    def epoch_log(self) -> list[dict]:
        """One dict per prepared epoch (see the class docstring)."""
        return self.epochs.epoch_log

    @property
    def hard_negatives(self) -> dict[int, list[str]]:
        """This epoch's wrong generations per document id (suffix forced to No)."""
        return self.epochs.hard_negatives

    @property
    def documents(self) -> list[Document]:
        """The training documents."""
        return self.epochs.documents

    @property
    def eval_documents(self) -> list[Document] | None:
        """The calibration (first evaluation) set's documents, or None."""
        return self.epochs.eval_documents

    @property
    def control_tokens(self) -> ControlTokens:
        """The control strings."""
        return self.epochs.control_tokens

    def build_final_head(
        self, generate: bool = True, calibration: str = "mixed", generations: list[str] | None = None
    ) -> SDMHead:
        """:meth:`SDMEpochs.build_final_head <sdm_hf.lm.epochs.SDMEpochs.build_final_head>`: the test-time
        verification head on the evaluation (calibration) documents; it becomes :attr:`head`."""
        return self.epochs.build_final_head(generate=generate, calibration=calibration, generations=generations)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        # Overridden: with hard_negative_timing="in_epoch" the batch's scheduled documents are
        # generated for with the current weights first, and their wrong generations may replace
        # their static negatives in this batch (SDMEpochs.generate_in_batch).
        if self.epochs.epoch_state.pending_generation and "document_id" in inputs:
            inputs = self.epochs.generate_in_batch(inputs)
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
        head = self.epochs.loss_head if self.args.use_sdm_loss else None
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
            support_row = self.epochs.loss_support_row
            if support_row is not None and doc_ids is not None:
                ids = doc_ids.cpu()
                if int(ids.max()) < support_row.numel():
                    support = support_row[ids]  # the self-excluded view for head-training documents
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
        eval_sets = self.epochs.eval_sets
        if isinstance(eval_dataset, dict) or (eval_dataset is None and eval_sets and "" not in eval_sets):
            sets = eval_dataset if isinstance(eval_dataset, dict) else {name: name for name in eval_sets}
            metrics: dict[str, float] = {}
            for name, data in sets.items():
                metrics.update(self.evaluate(data, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        if isinstance(eval_dataset, str):  # a name: the Trainer's own loop over the constructor's dict
            if eval_dataset not in self.epochs.eval_version_sets:
                known = sorted(self.epochs.eval_version_sets)
                raise ValueError(f"no evaluation set named {eval_dataset!r}; known: {known}")
            versions = self.epochs.eval_version_sets[eval_dataset]
        elif eval_dataset is None or isinstance(eval_dataset, VersionDataset):
            versions = eval_dataset or self.epochs.eval_versions
        else:
            documents, _ = prepare_documents(eval_dataset, self.control_tokens, self._append_control)
            if not documents:
                raise ValueError("eval_dataset has no document with a positive completion to evaluate on")
            encoded = encode_documents(self.processing_class, documents, self.control_tokens, self.args.max_length)
            versions = VersionDataset()
            versions.rows = self.epochs.evaluation_rows(documents, encoded)
        return self._evaluate_versions(versions, ignore_keys, metric_key_prefix)

    def _evaluate_versions(
        self, versions: VersionDataset, ignore_keys: list[str] | None, metric_key_prefix: str
    ) -> dict[str, float]:
        if not versions.rows:  # no evaluation set: the Trainer's own error
            return super().evaluate(None, ignore_keys, metric_key_prefix)
        extra: dict[str, float] = {}
        epochs = self.epochs
        saved = (epochs.loss_head, epochs.loss_support_row)
        if self.args.use_sdm_loss:
            timing: dict[str, float] = {}  # the main process's head figures, the same on every process
            eval_head, eval_support = epochs.heads.fit_shared(
                versions.rows, seed=int(self.args.seed) + 77, timing=timing
            )
            epochs.loss_head, epochs.loss_support_row = eval_head, eval_support
            figures = {k: v for k, v in timing.items() if k.startswith("head_") and not k.endswith("_seconds")}
            extra = {f"{metric_key_prefix}_{k}": v for k, v in figures.items()}
        try:
            metrics = super().evaluate(versions, ignore_keys, metric_key_prefix)
        finally:
            epochs.loss_head, epochs.loss_support_row = saved
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
        self.epochs.sync_in_epoch_state()
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
            logger.warning("%s is missing: the SDM state restarts from the next epoch", folder / STATE_NAME)
            return
        epochs = self.epochs
        rows = [epochs._encode(epochs.documents[i], text, reward) for i, text, reward in state.versions]
        head_dir = folder / HEAD_SUBFOLDER
        epochs.head = SDMHead.from_pretrained(head_dir) if (head_dir / "config.json").is_file() else None
        epochs.epoch_state, epochs.head_epoch, epochs.train_versions.rows = state, state.prepared_epoch, rows
        epochs.loss_head, epochs.loss_support_row = epochs.head, state.support_row

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
        self.epochs.loss_head, self.epochs.loss_support_row = self.head, support

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
