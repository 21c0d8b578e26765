"""The per-epoch steps of SDM fine-tuning as ``transformers`` callbacks.

``transformers`` calls a callback with the training arguments, state and control, not with
the trainer; these callbacks act on the trainer's SDM state, so they are given the trainer
when constructed (as TRL's callbacks are given what they act on). :class:`SDMTrainer
<sdm_hf.lm.SDMTrainer>` adds both, in this order, and also runs both steps for epoch 0 at
construction (its loader is sized from the epoch's versions before the first epoch begins):

1. :class:`HardNegativeCallback` — draws each document's version for the epoch and
   generates online hard negatives (one seeded random stream feeds both, so they are one
   step);
2. :class:`HeadRefreshCallback` — refits the training-time verification head, which reads
   the hard negatives of the epoch before.

Each step is idempotent per epoch, so resuming from a checkpoint (whose epoch is already
prepared) draws nothing twice.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from .sdm_trainer import SDMTrainer

__all__ = ["HardNegativeCallback", "HeadRefreshCallback", "epoch_index"]


def epoch_index(state: TrainerState) -> int:
    """The 0-based epoch that is beginning, from a ``TrainerState`` (whose ``epoch`` is a
    float: the tolerance keeps a rounding error just below a whole number from counting as
    the epoch before)."""
    return int(math.floor((state.epoch or 0.0) + 1e-6))


class HardNegativeCallback(TrainerCallback):
    """At each epoch start, :meth:`SDMTrainer.prepare_epoch_versions
    <sdm_hf.lm.SDMTrainer.prepare_epoch_versions>`: the documents' versions (positive with
    probability ``gamma_pos``) and, from ``hard_negatives_from_epoch`` on, greedy
    generations judged by the verifier, whose wrong ones become hard negatives.

    Args:
        trainer: the :class:`~sdm_hf.lm.SDMTrainer` whose epochs it prepares.
    """

    def __init__(self, trainer: SDMTrainer):
        self.trainer = trainer

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.trainer.prepare_epoch_versions(epoch_index(state))


class HeadRefreshCallback(TrainerCallback):
    """At each epoch start, after :class:`HardNegativeCallback`,
    :meth:`SDMTrainer.refresh_verification_head
    <sdm_hf.lm.SDMTrainer.refresh_verification_head>`: the training-time verification head
    is refitted on the current model's features, so the loss's ``beta`` follows the model;
    then the epoch's figures go through ``Trainer.log``
    (:meth:`~sdm_hf.lm.SDMTrainer.log_epoch_refresh`).

    Args:
        trainer: the :class:`~sdm_hf.lm.SDMTrainer` whose head it refreshes.
    """

    def __init__(self, trainer: SDMTrainer):
        self.trainer = trainer

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        epoch = epoch_index(state)
        self.trainer.refresh_verification_head(epoch)
        self.trainer.log_epoch_refresh(epoch)
