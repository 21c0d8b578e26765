"""The result records of the SDM pipelines and :class:`sdm_hf.SDMClassifier`."""

from __future__ import annotations

from typing import Any

from ...head.modeling import SDMHead

__all__ = ["tiers", "nearest_exemplar", "text_result"]


def tiers(record: dict[str, Any]) -> dict[str, Any]:
    """For a head with ``SDMConfig.alphas``: ``high_reliability_alpha`` (the highest alpha whose HR
    region admits the input, None for none) and ``high_reliability_at`` (``{"0.9": bool, ...}``,
    membership of each tier's region: tiers are not nested); else ``{}``."""
    keys = ("high_reliability_alpha", "high_reliability_at")
    return {k: record[k] for k in keys if k in record}


def nearest_exemplar(head: SDMHead, index: int) -> dict:
    """The explanation of a prediction: ``index``, ``id``, ``label`` and ``text`` of support row
    ``index`` (all None for -1: no support row)."""
    if index < 0 or head.support is None:
        return {"index": None, "id": None, "label": None, "text": None}
    label = int(head.support.labels[index])
    return {
        "index": index,
        "id": None if head.support_ids is None else head.support_ids[index],
        "label": "out-of-distribution" if label < 0 else head.config.label_name(label),
        "text": None if head.support_texts is None else head.support_texts[index],
    }


def text_result(record: dict[str, Any], truncated: bool, nearest: dict) -> dict[str, Any]:
    """One text's result from the head's record (:meth:`SDMOutput.to_list`): what
    ``pipeline("sdm-text-classification")`` and :meth:`sdm_hf.SDMClassifier.predict` return."""
    return {
        "label": record["label"],
        "score": record["probability"],
        "high_reliability": record["high_reliability"],
        "high_reliability_lower": record["high_reliability_lower"],
        "is_ood": record["is_ood"],
        "q": record["q"],
        "d": record["d"],
        "rescaled_similarity": record["rescaled_similarity"],
        "truncated": truncated,
        "nearest_exemplar": nearest,
        **tiers(record),
    }
