"""``SDMTrainingArguments``: transformers' ``TrainingArguments`` plus the SDM settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

__all__ = ["SDMTrainingArguments"]


@dataclass
class SDMTrainingArguments(TrainingArguments):
    """Training arguments of :class:`~sdm_hf.lm.SDMTrainer`: ``TrainingArguments`` plus the SDM settings.

    ``gamma_pos``, ``gamma_gen`` and ``gamma_diversity`` are the probabilities of Schmaltz 2025,
    *Similarity-Distance-Magnitude Language Models*, arXiv:2510.26183, Sec. 3.3 (train the positive; generate
    on the negative branch; let a wrong generation replace the static negative); ``alpha`` is the target
    accuracy of the verification head's high-reliability region (Schmaltz 2025, *Similarity-Distance-Magnitude
    Activations*, arXiv:2509.12760, Algorithm 1). ``remove_unused_columns`` is forced to False (the
    collator's metadata columns must reach the trainer).

    Raises:
        ValueError: a gamma outside [0, 1]; ``head_epochs`` (unless None), ``head_shuffles``, ``head_batch_size``,
            ``head_exemplar_dim`` or ``max_new_tokens`` not a positive int; an unknown ``hard_negative_timing``,
            ``verification_pooling`` or ``head_procedure``; ``head_learning_rate <= 0``; ``alpha`` outside (0.5, 1].
    """

    use_sdm_loss: bool = field(default=True, metadata={"help": "False: plain cross-entropy baseline, no heads."})
    alpha: float = field(default=0.95, metadata={"help": "Target accuracy of the verification head's HR region."})
    head_exemplar_dim: int = field(default=1000, metadata={"help": "Exemplar width M of the verification head."})
    head_procedure: str = field(
        default="auto",
        metadata={
            "help": "Named settings of every verification-head fit (sdm_hf.training.fit.PROCEDURES): 'auto' (at most "
            "100 epochs at Adam 1e-3, early-stopped and its normalisation chosen on held-out training rows, "
            "calibration rows used by Algorithm 1 only), 'paper' (200 epochs, Adam at 1e-5, no early "
            "stopping) or 'fast' (at most 100 epochs, Adam at 1e-3, early stopping on the calibration loss). "
            "head_epochs and head_learning_rate left at None take the procedure's values."
        },
    )
    head_epochs: int | None = field(
        default=None, metadata={"help": "Epochs of each verification-head fit (None: head_procedure's)."}
    )
    head_shuffles: int = field(default=1, metadata={"help": "Shuffles of each verification-head fit."})
    head_batch_size: int = field(default=50, metadata={"help": "Minibatch size of the head fit."})
    head_learning_rate: float | None = field(
        default=None, metadata={"help": "Adam learning rate of the head fit (None: head_procedure's)."}
    )
    gamma_pos: float = field(default=0.5, metadata={"help": "Probability of training a document's positive."})
    gamma_gen: float = field(default=0.5, metadata={"help": "Probability of generating a hard negative."})
    gamma_diversity: float = field(
        default=0.5, metadata={"help": "Probability that a wrong generation replaces the static negative."}
    )
    hard_negatives_from_epoch: int = field(default=1, metadata={"help": "First epoch (0-based) that generates."})
    max_new_tokens: int = field(default=64, metadata={"help": "Generation length for hard negatives."})
    max_length: int | None = field(default=None, metadata={"help": "Truncate documents to this many tokens."})
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Processes that tokenize the documents (datasets.Dataset.map)."}
    )
    hard_negative_timing: str = field(
        default="epoch_start",
        metadata={
            "help": "When hard negatives are generated: 'epoch_start' (all at once, batched, with the weights "
            "of the epoch start; faster) or 'in_epoch' (when the document's batch comes, with that step's "
            "weights, as the paper does)."
        },
    )
    verification_pooling: str = field(
        default="mean_last",
        metadata={
            "help": "Verification-head features from the hidden states up to p (the final <verified> tag): "
            "'mean_last' = concat(mean over 0..p, state at p) (the paper's), 'last' = state at p, 'mean' = mean."
        },
    )
    verification_layer: int = field(
        default=-1, metadata={"help": "Hidden-state layer of the verification features (-1: the final layer)."}
    )
    disable_dropout: bool = field(default=True, metadata={"help": "Set every dropout probability to 0."})
    prediction_loss_only: bool = field(default=True, metadata={"help": "Evaluation returns only the loss."})
    lean_logits: bool = field(
        default=True,
        metadata={
            "help": "Project onto the vocabulary only at supervised positions (logits_to_keep), when the "
            "model's forward accepts it: same loss and gradients, far less memory for large vocabularies."
        },
    )

    def __post_init__(self):
        for name in ("gamma_pos", "gamma_gen", "gamma_diversity"):
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        for name in ("head_epochs", "head_shuffles", "head_batch_size", "head_exemplar_dim", "max_new_tokens"):
            value = getattr(self, name)
            if name == "head_epochs" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        from ..training.fit import PROCEDURES
        from .verification_features import verification_feature_pooling

        if self.hard_negative_timing not in ("epoch_start", "in_epoch"):
            raise ValueError(
                f"hard_negative_timing must be 'epoch_start' or 'in_epoch', got {self.hard_negative_timing!r}"
            )

        verification_feature_pooling(self.verification_pooling)  # validates it
        if self.head_procedure not in PROCEDURES:
            raise ValueError(f"head_procedure must be one of {sorted(PROCEDURES)}, got {self.head_procedure!r}")
        if self.head_learning_rate is not None and not float(self.head_learning_rate) > 0.0:
            raise ValueError(f"head_learning_rate must be > 0 (or None), got {self.head_learning_rate}")
        if not 0.5 < float(self.alpha) <= 1.0:
            raise ValueError(f"alpha must satisfy 0.5 < alpha <= 1, got {self.alpha}")
        self.remove_unused_columns = False
        super().__post_init__()

    def head_fit_settings(self) -> dict:
        """Keyword arguments of every verification-head fit: ``head_procedure``'s values
        (:data:`sdm_hf.training.fit.PROCEDURES`) overridden by the ``head_*`` settings that are set; keys
        ``procedure``, ``epochs``, ``shuffles``, ``batch_size``, ``learning_rate``, ``patience``."""
        from ..training.fit import PROCEDURES

        named = PROCEDURES[self.head_procedure]
        return {
            "procedure": self.head_procedure,
            "epochs": named["epochs"] if self.head_epochs is None else self.head_epochs,
            "shuffles": self.head_shuffles,
            "batch_size": self.head_batch_size,
            "learning_rate": named["learning_rate"] if self.head_learning_rate is None else self.head_learning_rate,
            "patience": named["patience"],
        }
