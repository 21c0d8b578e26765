"""The per-epoch steps of SDM fine-tuning as ``transformers`` callbacks.

``transformers`` calls a callback with the training arguments, state and control only; these
callbacks act on the run's :class:`~sdm_hf.lm.epochs.SDMEpochs`, which they are given when
constructed (as TRL's callbacks are given what they act on). :class:`SDMTrainer
<sdm_hf.lm.SDMTrainer>` adds both, in this order, and runs both steps for epoch 0 at
construction (its loader is sized from the epoch's versions before the first epoch begins):

1. :class:`HardNegativeCallback`: each document's version for the epoch and the online hard
   negatives (one seeded random stream feeds both);
2. :class:`HeadRefreshCallback`: the training-time verification head, refitted on the current
   model (it reads the hard negatives of the epoch before).

Each step is idempotent per epoch, so resuming from a checkpoint draws nothing twice.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from .epochs import SDMEpochs

__all__ = ["HardNegativeCallback", "HeadRefreshCallback", "epoch_index"]


def epoch_index(state: TrainerState) -> int:
    """The 0-based epoch that is beginning, from ``TrainerState.epoch`` (a float; the tolerance
    keeps a rounding error just below a whole number from counting as the epoch before)."""
    return int(math.floor((state.epoch or 0.0) + 1e-6))


class HardNegativeCallback(TrainerCallback):
    """At each epoch start, :meth:`~sdm_hf.lm.epochs.SDMEpochs.prepare_epoch_versions`.

    Args:
        epochs: the run's :class:`~sdm_hf.lm.epochs.SDMEpochs` (``trainer.epochs``).
    """

    def __init__(self, epochs: SDMEpochs):
        self.epochs = epochs

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.epochs.prepare_epoch_versions(epoch_index(state))


class HeadRefreshCallback(TrainerCallback):
    """At each epoch start, after :class:`HardNegativeCallback`:
    :meth:`~sdm_hf.lm.epochs.SDMEpochs.refresh_verification_head` (so the loss's ``beta`` follows
    the model), then :meth:`~sdm_hf.lm.epochs.SDMEpochs.log_epoch_refresh`.

    Args:
        epochs: the run's :class:`~sdm_hf.lm.epochs.SDMEpochs` (``trainer.epochs``).
    """

    def __init__(self, epochs: SDMEpochs):
        self.epochs = epochs

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        epoch = epoch_index(state)
        self.epochs.refresh_verification_head(epoch)
        self.epochs.log_epoch_refresh(epoch)
