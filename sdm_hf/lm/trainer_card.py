"""The model card of an SDM language model trained with :class:`~sdm_hf.lm.SDMTrainer`: transformers' card
with the SDM tags and one SDM section (the promise, base model, data format, SDM settings and the head's
calibration) merged in between :data:`~sdm_hf.head.model_card.SECTION_START` / ``SECTION_END``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import ModelCard, ModelCardData

from ..head.model_card import (
    SECTION_END,
    SECTION_START,
    head_card_data,
    merge_model_card,
    render_section,
    replace_section,
)

if TYPE_CHECKING:
    from ..head.modeling import SDMHead
    from .control import ControlTokens

__all__ = ["LM_TAGS", "SDM_SETTINGS", "TrainerCardData", "render_trainer_section", "sdm_trainer_card"]

LM_TAGS = ("sdm", "sdm-language-model")
# the SDMTrainingArguments the card lists (transformers' card lists the optimisation ones)
SDM_SETTINGS = (
    "use_sdm_loss",
    "alpha",
    "gamma_pos",
    "gamma_gen",
    "gamma_diversity",
    "hard_negatives_from_epoch",
    "max_new_tokens",
    "max_length",
    "head_exemplar_dim",
    "head_procedure",
    "head_epochs",
    "head_shuffles",
    "head_batch_size",
    "head_learning_rate",
    "verification_pooling",
    "verification_layer",
    "disable_dropout",
)


@dataclass
class TrainerCardData:
    """What the SDM section of a trained language model's card shows.

    Attributes:
        base_model: the model fine-tuned (a Hub id or path), or None when unknown.
        alpha: the target accuracy of the verification head's high-reliability region.
        control: the control strings that end every completion.
        train_documents: training documents (prompts with a positive completion).
        eval_documents: calibration (first evaluation set) documents, None without one.
        settings: ``name -> value`` of the SDM training arguments (:data:`SDM_SETTINGS`).
    """

    base_model: str | None
    alpha: float
    control: ControlTokens
    train_documents: int
    eval_documents: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def render_trainer_section(
    data: TrainerCardData,
    head_section: str | None = None,
    repo_hint: str = "path/or/repo-id",
    calibration_source: str | None = None,
) -> str:
    """The SDM section (markdown, section markers included) of the trained model's card.

    Args:
        head_section: the head's section (:func:`~sdm_hf.head.model_card.render_section`, markers
            included) to append, or None when the model has no head yet.
        repo_hint: the name the loading snippet uses.
        calibration_source: what the head's calibration rows were drawn from, when known.
    """
    yes, no = data.control.suffix(True), data.control.suffix(False)
    promise = (
        f"Generations whose verification by the SDM head in `sdm_head/` lands in its high-reliability "
        f"region have accuracy at least alpha = {data.alpha} on data drawn like the head's calibration set "
        "(under distribution shift nothing is promised)."
        if head_section is not None
        else "No verification head was saved with this model yet: build one on the calibration set "
        "(`trainer.build_final_head()`, then `trainer.save_sdm_model(...)`) before relying on "
        "verification; only then do admitted generations carry the head's accuracy guarantee."
    )
    settings = "\n".join(f"| `{name}` | `{value}` |" for name, value in data.settings.items())
    lines = [
        "## SDM language model",
        "",
        "Fine-tuned with `sdm_hf`'s `SDMTrainer`: the Similarity-Distance-Magnitude next-token loss "
        "(Schmaltz 2025, *Similarity-Distance-Magnitude Language Models*, arXiv:2510.26183), whose "
        "verification head reads the hidden states up to the final `<verified>` control token.",
        "",
        f"**The promise.** {promise}",
        "",
        f"- Base model: `{data.base_model}`" if data.base_model else "- Base model: not recorded",
        f"- Training documents: {data.train_documents}"
        + (f"; calibration documents: {data.eval_documents}" if data.eval_documents is not None else ""),
        "- Data format: TRL preference data, either paired (`prompt`, `chosen`, `rejected`) or "
        "unpaired (`prompt`, `completion`, `label`); prompts are text or chat messages. Each "
        f"completion ends with its control suffix: `{yes}` for a positive, `{no}` for a negative.",
        "",
        "| SDM training setting | value |",
        "|---|---|",
        settings,
        "",
        "```python",
        "from transformers import pipeline",
        "import sdm_hf  # registers the sdm-verify task",
        f'verify = pipeline("sdm-verify", model="{repo_hint}")',
        'verify("a prompt")  # generated_text, verified, probability, high_reliability, ...',
        "```",
    ]
    if head_section is not None:
        lines += [
            "",
            "The head in `sdm_head/` is the trainer's head when this card was written: the latest epoch's "
            "training-time head (calibrated on half of the training documents), or, after "
            "`build_final_head()`, the test-time head calibrated on the calibration set. Its calibration "
            "points below say which; the promise holds for data like those.",
        ]
        if calibration_source:
            lines += ["", f"Calibration rows of this head: {calibration_source}."]
    body = "\n".join(lines)
    if head_section is not None:
        inner = head_section.split(SECTION_START, 1)[-1].rsplit(SECTION_END, 1)[0].strip()
        body = f"{body}\n\n{inner}"
    return f"{SECTION_START}\n{body}\n{SECTION_END}\n"


def sdm_trainer_card(
    existing: ModelCard | None,
    data: TrainerCardData,
    head: SDMHead | None,
    *,
    repo_hint: str,
    subfolder: str = "sdm_head",
    tags: list[str] | None = None,
) -> ModelCard:
    """``existing`` (transformers' card, or None) with everything it has kept, :data:`LM_TAGS` and ``tags``
    added, with a ``head`` (saved in ``subfolder``) its tags and calibration results, and the SDM section
    inserted or replacing a previous one."""
    extra = [*LM_TAGS, *(tags or [])]
    if head is not None:
        head_data = head_card_data(head, repo_hint=repo_hint, subfolder=subfolder)
        card = merge_model_card(existing, head_data, library_name="transformers", tags=extra)
        source = None if head.selection is None else head.selection.get("calibration_source")
        section = render_trainer_section(data, render_section(head_data), repo_hint, calibration_source=source)
    else:
        if existing is None:
            new_meta = ModelCardData(library_name="transformers")
            card = ModelCard(f"---\n{new_meta.to_yaml()}\n---\n\n# {Path(repo_hint).name}\n")
        else:
            card = ModelCard(str(existing))
        meta = card.data
        if not isinstance(meta, ModelCardData):  # ModelCard always parses into ModelCardData
            raise TypeError(f"expected a model card's metadata, got {type(meta).__name__}")
        meta.tags = list(dict.fromkeys([*(meta.tags or []), *extra]))
        section = render_trainer_section(data, repo_hint=repo_hint)
    card.text = replace_section(card.text, section)
    return card
