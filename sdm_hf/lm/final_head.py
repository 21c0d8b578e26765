"""The rows of the test-time verification head: which versions train it and which calibrate it
(Schmaltz 2025, *Similarity-Distance-Magnitude Language Models*, arXiv:2510.26183, Sec. 3.4).

Algorithm 1's promise is about rows drawn like its calibration rows, so the choice sets what it covers:
``"mixed"`` (the papers'): all positives, static negatives and wrong greedy generations, split 50/50 at random;
``"generations"``: half the prompts (seeded) calibrate with the model's own greedy generation, labelled by
the verifier, the other half train on the mix. (Derivation: docs/how_sdm_works.md, section
'Evaluation, checkpoints and the test-time head'.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .control import ControlTokens

__all__ = ["CALIBRATIONS", "FINAL_HEAD_SOURCES", "final_head_rows"]

CALIBRATIONS = ("mixed", "generations")
#: what the test-time head's calibration rows are, recorded with the head (``selection``)
FINAL_HEAD_SOURCES = {
    "mixed": "calibration documents: a random half of their positives, static negatives and wrong greedy "
    "generations (the papers' procedure)",
    "generations": "the model's own greedy generations of half of the calibration prompts, labelled by the verifier",
}


def final_head_rows(
    documents: Sequence[Any],
    negative_only: Sequence[Any],
    generations: Sequence[str] | None,
    calibration: str,
    seed: int,
    control: ControlTokens,
    verifier: Callable[[str, str], bool],
    encode: Callable[[Any, str, bool], dict],
    wrong_as_negatives: bool = True,
) -> tuple[list[dict], torch.Tensor | None, int]:
    """The encoded rows of the test-time head, each its own document (``document_id`` = index).

    Args:
        documents: the calibration documents (``positive``, ``negatives``, ``prompt``, ``id``).
        negative_only: calibration documents without a positive (their negatives train).
        generations: the model's greedy generation per document (None: no generations).
        calibration: ``"mixed"`` or ``"generations"`` (module docstring).
        seed: seeds the split of the prompts for ``"generations"``.
        verifier: ``verifier(gold content, generated content) -> bool``, control suffixes removed.
        encode: ``(document, text, positive) -> encoded row``.
        wrong_as_negatives: wrong generations of training documents join as negatives.

    Returns:
        ``(rows, calibration_mask, generated_negatives)``: ``calibration_mask`` ``(N,)`` bool (True: calibrates)
        for ``"generations"``, None for ``"mixed"``; ``generated_negatives`` counts the wrong generations added.

    Raises:
        ValueError: an unknown ``calibration``, ``"generations"`` without generations, or fewer
            than 2 right or 2 wrong generations among the calibrating prompts.
    """
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be 'mixed' or 'generations', got {calibration!r}")
    if calibration == "generations" and generations is None:
        raise ValueError("calibration='generations' needs the model's generations")
    calibrating: set[int] = set()
    if calibration == "generations":
        order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(int(seed)))
        calibrating = set(order[len(documents) // 2 :].tolist())
    rows, in_calibration, generated = [], [], 0
    for i, doc in enumerate(documents):
        generation = None if generations is None else generations[i]
        if generation is not None and i in calibrating:  # the model's own output, labelled by r
            content = control.remove_suffix(generation)
            correct = bool(verifier(control.remove_suffix(doc.positive), content))
            rows.append(encode(doc, control.add(content, correct), correct))
            in_calibration.append(True)
            continue
        texts = list(doc.negatives)
        if generation is not None and wrong_as_negatives:
            content = control.remove_suffix(generation)
            if not verifier(control.remove_suffix(doc.positive), content):  # never a right answer as negative
                texts.append(control.add(content, False))
                generated += 1
        versions = [encode(doc, doc.positive, True)] + [encode(doc, text, False) for text in texts]
        rows.extend(versions)
        in_calibration.extend([False] * len(versions))
    for doc in negative_only:
        rows.extend(encode(doc, text, False) for text in doc.negatives)
        in_calibration.extend([False] * len(doc.negatives))
    rows = [dict(row, document_id=i) for i, row in enumerate(rows)]
    if calibration == "mixed":
        return rows, None, generated
    mask = torch.tensor(in_calibration, dtype=torch.bool)
    right = sum(bool(r["reward"]) for r, m in zip(rows, in_calibration) if m)
    if min(right, int(mask.sum()) - right) < 2:
        raise ValueError(
            f"the model's own generations of the {int(mask.sum())} held-out calibration prompts are {right} right "
            "and the rest wrong; a head calibrated on them needs at least 2 of each: use more calibration prompts "
            "or calibration='mixed'"
        )
    return rows, mask, generated
