"""The SDM head's model card: a dataclass of what the card shows, filled from the head's state,
rendered with huggingface_hub's ``ModelCard.from_template`` and the packaged template
``sdm_hf/model_cards/sdm_head.md``."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from importlib import resources

import torch
from huggingface_hub import ModelCard, ModelCardData

from ..metrics import label_names
from .config import SDMConfig
from .diagnostics import calibration_report
from .state import CalibrationState

__all__ = ["SDMCardData", "card_data", "render_model_card", "HUB_TAGS"]

HUB_TAGS = ("sdm", "selective-classification", "uncertainty-quantification")


@dataclass
class SDMCardData:
    """Everything the SDM head's model card shows (the template's variables)."""

    title: str
    alpha: float
    q_min: str
    thresholds: str
    empty_region: bool
    support_size: int
    calibration_size: int
    admission: str
    report: str
    classes: list[dict]
    input_dim: int
    exemplar_dim: int
    base_model: str | None = None
    base_model_revision: str | None = None
    feature_pooling: str | None = None
    feature_layer: int | None = None
    feature_max_length: int | None = None
    repo_hint: str = "path/or/repo-id"
    subfolder: str | None = None
    tags: list[str] = field(default_factory=lambda: sorted(HUB_TAGS))


def card_data(
    config: SDMConfig,
    alpha: float,
    support_labels: torch.Tensor | None,
    calibration: CalibrationState | None,
    repo_hint: str | None = None,
    subfolder: str | None = None,
    tags: Iterable[str] = HUB_TAGS,
) -> SDMCardData:
    """The card's contents for a head with ``config``, current ``alpha``, support labels
    ``[N]`` (None before ``build_support``) and calibration (None before ``calibrate``)."""
    c = config.num_classes
    names = label_names(c, config.id2label)
    support_counts = torch.bincount(support_labels, minlength=c).tolist() if support_labels is not None else [0] * c
    cal = calibration
    cal_counts = torch.bincount(cal.labels, minlength=c).tolist() if cal is not None else [0] * c
    if cal is not None:
        report = calibration_report(cal, alphas=sorted({0.9, cal.alpha}), id2label=config.id2label)
        admitted, _ = report.admitted_at()
        admission = f"{admitted} of {cal.size} ({admitted / max(cal.size, 1):.1%})"
        report_md = report.to_markdown()
        q_min = f"{cal.q_min:.4g}" if math.isfinite(cal.q_min) else "inf (empty region)"
        thresholds = ", ".join(f"{names[k]}: {v:.4f}" for k, v in enumerate(cal.thresholds.tolist()))
    else:
        admission, report_md, q_min, thresholds = "not calibrated", "not calibrated", "-", "-"
    return SDMCardData(
        title=f"SDM head{' for ' + config.base_model if config.base_model else ''}",
        alpha=alpha,
        q_min=q_min,
        thresholds=thresholds,
        empty_region=cal is not None and cal.is_empty_region,
        support_size=0 if support_labels is None else int(support_labels.numel()),
        calibration_size=0 if cal is None else cal.size,
        admission=admission,
        report=report_md,
        classes=[
            {"index": k, "label": names[k], "support": support_counts[k], "calibration": cal_counts[k]}
            for k in range(c)
        ],
        input_dim=config.input_dim,
        exemplar_dim=config.exemplar_dim,
        base_model=config.base_model,
        base_model_revision=config.base_model_revision,
        feature_pooling=config.feature_pooling,
        feature_layer=config.feature_layer,
        feature_max_length=config.feature_max_length,
        repo_hint=repo_hint or "path/or/repo-id",
        subfolder=subfolder,
        tags=sorted(set(tags)),
    )


def render_model_card(data: SDMCardData) -> ModelCard:
    """The Hub model card (YAML metadata + markdown) of ``data``."""
    metadata = ModelCardData(library_name="sdm_hf", tags=data.tags, base_model=data.base_model)
    template = resources.files("sdm_hf").joinpath("model_cards/sdm_head.md").read_text(encoding="utf-8")
    values = asdict(data)
    values.pop("tags")
    return ModelCard.from_template(metadata, template_str=template, **values)
