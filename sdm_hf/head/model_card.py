"""Model cards of SDM heads (:func:`render_model_card`) and of repositories carrying one (:func:`merge_model_card`).

A merged card keeps the model's own card and adds the SDM tags, results and a section between
:data:`SECTION_START` and :data:`SECTION_END` (replaced, not duplicated, on a re-save). Calibration results go
into the YAML ``model-index`` as Hub evaluation results: HR admission rate (``coverage``) and HR accuracy
(``accuracy``), overall and per true class at the head's alpha, named as in-sample calibration-split figures,
not a test estimate. No license is invented: a merged card keeps the model's unless one is given.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..maths.activation import high_reliability_mask
from ..utils.counting import accuracy_or_none, format_accuracy, label_names
from ..utils.validation import looks_like_repo_id
from .config import SDMConfig
from .diagnostics import calibration_report
from .state import CalibrationState

__all__ = [
    "SDMCardData",
    "card_data",
    "head_card_data",
    "render_model_card",
    "render_section",
    "merge_model_card",
    "replace_section",
    "eval_results",
    "HUB_TAGS",
    "SECTION_START",
    "SECTION_END",
    "CALIBRATION_DATASET_TYPE",
    "CARD_METADATA_KEYS",
]

HUB_TAGS = ("sdm", "selective-classification", "uncertainty-quantification")
SECTION_START = "<!-- sdm_hf:section:start (written by sdm_hf on every save; edit outside these markers) -->"
SECTION_END = "<!-- sdm_hf:section:end -->"
# marks the evaluation results sdm_hf writes, so that a re-save replaces them and keeps the model's own
CALIBRATION_DATASET_TYPE = "sdm-calibration-split"
CALIBRATION_TASK_NAME = "Selective classification (SDM high-reliability region)"
CALIBRATION_DATASET_NAME = "Calibration split (in-sample for the HR thresholds; not a test estimate)"
REPO_PLACEHOLDER = "path/or/repo-id"  # the loading snippet's name when the card is not told where it lives
# model_card_kwargs that set YAML metadata; every other key is a template variable
CARD_METADATA_KEYS = ("license", "license_name", "license_link", "language", "datasets", "pipeline_tag", "model_name")


@dataclass
class SDMCardData:
    """Everything the SDM head's model card shows (the template's variables).

    ``classes``: one dict per class with ``index``, ``label``, ``support``, ``calibration`` (points of that
    true class) and, once calibrated, ``admitted``, ``admitted_fraction``, ``accuracy`` (class-conditional
    among admitted; None when none). ``overall``: ``n``, ``admitted``, ``accuracy`` (empty before calibration).
    """

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
    feature_blocks: list[dict] | None = None
    repo_hint: str = REPO_PLACEHOLDER
    subfolder: str | None = None
    tags: list[str] = field(default_factory=lambda: sorted(HUB_TAGS))
    calibrated: bool = False
    overall: dict = field(default_factory=dict)


def head_card_data(
    head: Any, repo_hint: str | None = None, subfolder: str | None = None, tags: Iterable[str] = HUB_TAGS
) -> SDMCardData:
    """:func:`card_data` of an ``SDMHead`` (its config, alpha, support labels, calibration)."""
    labels = None if head.support is None else head.support.labels
    return card_data(head.config, head.alpha, labels, head.calibration, repo_hint, subfolder, tags)


def card_data(
    config: SDMConfig,
    alpha: float,
    support_labels: torch.Tensor | None,
    calibration: CalibrationState | None,
    repo_hint: str | None = None,
    subfolder: str | None = None,
    tags: Iterable[str] = HUB_TAGS,
) -> SDMCardData:
    """The card's contents for a head with ``config``, current ``alpha``, ``support_labels (N,)`` int64
    (None before ``build_support``) and ``calibration`` (None before ``calibrate``)."""
    c = config.num_classes
    names = label_names(c, config.id2label)
    known = None if support_labels is None else support_labels[support_labels >= 0]  # known OOD rows: -1
    support_counts = torch.bincount(known, minlength=c).tolist() if known is not None else [0] * c
    cal = calibration
    cal_counts = torch.bincount(cal.labels, minlength=c).tolist() if cal is not None else [0] * c
    classes: list[dict] = [
        {"index": k, "label": names[k], "support": support_counts[k], "calibration": cal_counts[k]} for k in range(c)
    ]
    overall: dict = {}
    if cal is not None:
        tiers = {0.9, cal.alpha, *(config.alphas or [])}  # the head's alpha, 0.9 and its risk tiers
        report = calibration_report(cal, alphas=sorted(tiers), id2label=config.id2label)
        admitted, _ = report.admitted_at()
        admission = f"{admitted} of {cal.size} ({admitted / max(cal.size, 1):.1%})"
        report_md = report.to_markdown()
        q_min = f"{cal.q_min:.4g}" if math.isfinite(cal.q_min) else "inf (empty region)"
        thresholds = ", ".join(f"{names[k]}: {v:.4f}" for k, v in enumerate(cal.thresholds.tolist()))
        for row in (r for r in report.rows if r["alpha"] == cal.alpha):
            classes[row["class"]].update(
                admitted=row["admitted"], admitted_fraction=row["admitted_fraction"], accuracy=row["accuracy"]
            )
        in_hr = high_reliability_mask(
            cal.predicted_probability, cal.predictions, cal.rescaled_similarity, cal.q_min, cal.thresholds
        )
        right = int((in_hr & (cal.predictions == cal.labels)).sum())
        overall = {"n": cal.size, "admitted": admitted, "accuracy": accuracy_or_none(right, admitted)}
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
        classes=classes,
        input_dim=config.input_dim,
        exemplar_dim=config.exemplar_dim,
        base_model=config.base_model,
        base_model_revision=config.base_model_revision,
        feature_pooling=config.feature_pooling,
        feature_layer=config.feature_layer,
        feature_max_length=config.feature_max_length,
        feature_blocks=config.feature_blocks,
        repo_hint=repo_hint or REPO_PLACEHOLDER,
        subfolder=subfolder,
        tags=sorted(set(tags)),
        calibrated=cal is not None,
        overall=overall,
    )


def eval_results(data: SDMCardData, task_type: str = "text-classification") -> list[EvalResult]:
    """The calibration results of ``data`` as Hub evaluation results (empty before calibration).

    Overall, then per true class: ``admitted / n`` (type ``coverage``) and, when any is admitted,
    ``correct / admitted`` (``accuracy``), rounded to 4 decimals, ``metric_args`` ``{"alpha", "class"}``.
    """
    if not data.calibrated:
        return []
    common: dict[str, Any] = {
        "task_type": task_type,
        "task_name": CALIBRATION_TASK_NAME,
        "dataset_type": CALIBRATION_DATASET_TYPE,
        "dataset_name": CALIBRATION_DATASET_NAME,
        "dataset_split": "calibration",
    }
    scopes = [(None, data.overall["n"], data.overall["admitted"], data.overall["accuracy"])]
    scopes += [(row["label"], row["calibration"], row["admitted"], row["accuracy"]) for row in data.classes]
    results = []
    for label, n, admitted, accuracy in scopes:
        args: dict[str, Any] = {"alpha": data.alpha} | ({} if label is None else {"class": label})
        where = f" (class {label}, alpha={data.alpha})" if label is not None else f" (alpha={data.alpha})"
        results.append(
            EvalResult(
                metric_type="coverage",
                metric_value=round(admitted / n, 4) if n else 0.0,
                metric_name="HR admission rate" + where,
                metric_args=args,
                **common,
            )
        )
        if accuracy is not None:
            results.append(
                EvalResult(
                    metric_type="accuracy",
                    metric_value=round(accuracy, 4),
                    metric_name="HR accuracy" + where,
                    metric_args=args,
                    **common,
                )
            )
    return results


def hub_base_model(name: str | None) -> str | None:
    """``name`` when it can be a Hub model id (valid ``base_model`` metadata), else None (e.g. a local path)."""
    if not name or not looks_like_repo_id(name) or Path(name).expanduser().exists():
        return None
    return name


def split_card_kwargs(model_card_kwargs: Mapping[str, Any] | None) -> tuple[dict, list[str], str | None, dict]:
    """``model_card_kwargs`` as ``(metadata, extra tags, template_str, template variables)``.

    :data:`CARD_METADATA_KEYS` set YAML metadata, ``tags`` (str or list of str) are added, ``template_str``
    replaces the packaged template, every other key is a template variable.

    Raises:
        TypeError: ``tags``, ``template_str`` or ``license`` of the wrong type.
    """
    kwargs = dict(model_card_kwargs or {})
    tags = kwargs.pop("tags", None) or []
    tags = [tags] if isinstance(tags, str) else list(tags)
    if not all(isinstance(t, str) for t in tags):
        raise TypeError(f"model_card_kwargs['tags'] must be a string or a list of strings, got {tags!r}")
    template_str = kwargs.pop("template_str", None)
    if template_str is not None and not isinstance(template_str, str):
        raise TypeError(f"model_card_kwargs['template_str'] must be a string, got {type(template_str).__name__}")
    license_ = kwargs.get("license")
    if license_ is not None and not isinstance(license_, str):
        raise TypeError(f"model_card_kwargs['license'] must be a string (e.g. 'apache-2.0'), got {license_!r}")
    metadata = {k: kwargs.pop(k) for k in CARD_METADATA_KEYS if k in kwargs and kwargs[k] is not None}
    return metadata, tags, template_str, kwargs


def _template(name: str) -> str:
    return resources.files("sdm_hf").joinpath(f"model_cards/{name}").read_text(encoding="utf-8")


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def render_model_card(data: SDMCardData, **model_card_kwargs: Any) -> ModelCard:
    """The head's own model card (YAML metadata + markdown) of ``data``; ``model_card_kwargs`` as in
    :func:`split_card_kwargs` (TypeError on a wrong type)."""
    metadata, extra_tags, template_str, variables = split_card_kwargs(model_card_kwargs)
    results = eval_results(data, task_type=metadata.get("pipeline_tag", "text-classification"))
    if results:
        metadata.setdefault(
            "model_name", data.title if data.repo_hint == REPO_PLACEHOLDER else Path(data.repo_hint).name
        )
    card_metadata = ModelCardData(
        library_name="sdm_hf",
        tags=_unique([*data.tags, *extra_tags]),
        base_model=hub_base_model(data.base_model),
        eval_results=results or None,
        **metadata,
    )
    values = asdict(data)
    values.pop("tags")
    values.update(variables)
    return ModelCard.from_template(card_metadata, template_str=template_str or _template("sdm_head.md"), **values)


def render_section(data: SDMCardData) -> str:
    """The SDM section of a model's card, markers included: alpha, HR admission, per-class table, loading."""
    table = [
        f"| {row['index']} | {row['label']} | {row['calibration']} | "
        + (
            f"{row['admitted']} ({row['admitted_fraction']:.1%}) | {format_accuracy(row['accuracy'])} |"
            if data.calibrated
            else "- | - |"
        )
        for row in data.classes
    ]
    # rendered through huggingface_hub (its jinja2 check and error messages); only the body is kept
    card = ModelCard.from_template(
        ModelCardData(), template_str=_template("sdm_section.md"), class_table="\n".join(table), **asdict(data)
    )
    body = card.text.strip()
    return f"{SECTION_START}\n{body}\n{SECTION_END}\n"


def _replace_section(text: str, section: str) -> str:
    """``text`` with its SDM section replaced, or ``section`` inserted after the first heading's paragraph."""
    starts, ends = text.count(SECTION_START), text.count(SECTION_END)
    if starts or ends:
        if starts != 1 or ends != 1 or text.index(SECTION_START) > text.index(SECTION_END):
            raise ValueError(
                f"the model card has {starts} SDM section start and {ends} end markers (expected one pair, in order); "
                f"remove the damaged section ({SECTION_START!r} ... {SECTION_END!r}) from README.md and save again"
            )
        before, rest = text.split(SECTION_START, 1)
        after = rest.split(SECTION_END, 1)[1]
        return before + section.rstrip("\n") + after
    lines = text.splitlines(keepends=True)
    heading = next((i for i, line in enumerate(lines) if line.startswith("# ")), None)
    if heading is None:
        return "\n" + section + "\n" + text.lstrip("\n")
    end = heading + 1
    while end < len(lines) and lines[end].strip() == "":
        end += 1
    while end < len(lines) and lines[end].strip() != "" and not lines[end].startswith("#"):
        end += 1  # the heading's first paragraph (a summary line, a template comment) stays above
    return "".join(lines[:end]).rstrip("\n") + "\n\n" + section + "\n" + "".join(lines[end:]).lstrip("\n")


def replace_section(text: str, section: str) -> str:
    """A card's markdown ``text`` with its SDM section replaced by ``section`` (markers included), or
    ``section`` inserted after the first top-level heading's paragraph (at the start without one).

    Raises:
        ValueError: ``text`` has a damaged section (not exactly one start and one end marker, in order).
    """
    return _replace_section(text, section)


def merge_model_card(
    existing: ModelCard | None,
    data: SDMCardData,
    *,
    library_name: str = "sdm_hf",
    title: str | None = None,
    **model_card_kwargs: Any,
) -> ModelCard:
    """The card of a model repository that carries an SDM head in ``data.subfolder``.

    An ``existing`` card (not modified) keeps its metadata, body, tags and own evaluation results; the SDM
    tags are appended, the SDM results and section replace a previous save's. Without one: a new card with
    ``library_name``, the head's Hub base model, a ``title`` heading and the section. ``model_card_kwargs``:
    ``tags`` are added, explicit :data:`CARD_METADATA_KEYS` replace the card's, template variables are ignored.

    Raises:
        TypeError: a ``model_card_kwargs`` value of the wrong type.
        ValueError: the existing card's SDM section is damaged.
    """
    metadata, extra_tags, _, _ = split_card_kwargs(model_card_kwargs)
    if existing is None:
        meta = ModelCardData(library_name=library_name, base_model=hub_base_model(data.base_model))
        text = f"\n# {title or Path(data.repo_hint).name}\n\nA model with an SDM head (`sdm_hf`) beside it.\n"
        card = ModelCard(f"---\n{meta.to_yaml()}\n---\n{text}")
    else:
        card = ModelCard(str(existing))  # a copy: the caller's card is left as it was
    card_meta = card.data
    if not isinstance(card_meta, ModelCardData):  # ModelCard always parses into ModelCardData
        raise TypeError(f"expected a model card's metadata, got {type(card_meta).__name__}")
    card_meta.tags = _unique([*(card_meta.tags or []), *HUB_TAGS, *extra_tags])
    for key, value in metadata.items():
        if key != "model_name":
            card_meta[key] = value
    kept = [r for r in (card_meta.eval_results or []) if r.dataset_type != CALIBRATION_DATASET_TYPE]
    ours = eval_results(data, task_type=card_meta.pipeline_tag or "text-classification")
    merged = kept + ours
    # an empty model-index (a Trainer writes one) is kept: dropping it leaves a stray `model_name` key
    card_meta.eval_results = merged if merged or card_meta.eval_results is not None else None
    if card_meta.eval_results:
        card_meta.model_name = metadata.get("model_name") or card_meta.model_name or Path(data.repo_hint).name
    card.text = _replace_section(card.text, render_section(data))
    return card
