"""``SDMFitConfig``: the training settings of :func:`~sdm_hf.fit_sdm_head` as one dataclass.

In the manner of TRL's trainer configs: every field carries its ``help``, so scripts and the
``sdm-hf fit-head`` command build their options with ``transformers.HfArgumentParser``::

    from transformers import HfArgumentParser
    (settings,) = HfArgumentParser(SDMFitConfig).parse_args_into_dataclasses()
    head = fit_sdm_head(train_x, train_y, calib_x, calib_y, **settings.to_kwargs())
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .fit import PROCEDURES

__all__ = ["SDMFitConfig"]


@dataclass
class SDMFitConfig:
    """Training settings of :func:`~sdm_hf.fit_sdm_head`; None leaves a setting to ``procedure``.

    Raises:
        ValueError: an unknown ``procedure``.
    """

    procedure: str = field(
        default="auto",
        metadata={
            "help": "named training settings: auto = settings chosen and early-stopped on held-out training rows, "
            "calibration rows used by Algorithm 1 only; paper = the papers' 10 shuffles x 200 epochs at lr 1e-5 on "
            "re-split data; fast = lr 1e-3, 2 x <= 100 epochs with early stopping (the options below override "
            "single settings)",
            "choices": tuple(PROCEDURES),
        },
    )
    epochs: int | None = field(default=None, metadata={"help": "epochs per run (default: the procedure's)"})
    shuffles: int | None = field(default=None, metadata={"help": "training runs (default: the procedure's)"})
    batch_size: int | None = field(
        default=None, metadata={"help": "training rows per minibatch of the head (default: the procedure's)"}
    )
    learning_rate: float | None = field(
        default=None, metadata={"help": "Adam learning rate (default: the procedure's)"}
    )
    patience: int | None = field(
        default=None, metadata={"help": "early stopping after N epochs without improvement (0: off)"}
    )
    selection_fraction: float | None = field(
        default=None,
        metadata={
            "help": "share of the calibration rows kept apart to choose the epoch and run (default: the procedure's)"
        },
    )
    holdout_fraction: float | None = field(
        default=None,
        metadata={"help": "auto: share of the training rows held out to choose settings (default: 0.25)"},
    )
    resplit: bool | None = field(
        default=None,
        metadata={
            "help": "true: merge train and calibration and re-split them 50/50 (the default of paper and fast); "
            "false: keep the given split (the default of auto)"
        },
    )
    seed: int = field(default=0, metadata={"help": "seeds the splits, initialisation and minibatch order"})
    use_sdm_loss: bool = field(
        default=True, metadata={"help": "train with the SDM loss (false: cross-entropy, the CE-adaptor baseline)"}
    )

    def __post_init__(self) -> None:
        if self.procedure not in PROCEDURES:
            raise ValueError(f"procedure must be one of {sorted(PROCEDURES)}, got {self.procedure!r}")

    def to_kwargs(self) -> dict[str, Any]:
        """The settings as keyword arguments of :func:`~sdm_hf.fit_sdm_head`."""
        return asdict(self)
