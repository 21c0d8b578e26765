"""The ``"auto"`` training procedure: settings chosen on held-out training rows, never on calibration rows.

So the calibration rows of Algorithm 1 (Schmaltz (2025), Similarity-Distance-Magnitude Activations,
arXiv:2509.12760) stay exchangeable with new rows given the head. Rule: each candidate's HR region is estimated
on random halves of the held-out rows; it *holds* when no class's admitted accuracy is more than
``2 sqrt(alpha (1 - alpha) / n)`` below alpha (``n``: admitted per draw); the holding candidate admitting most
is kept, else the one of lowest held-out loss (derivation: docs/how_sdm_works.md, section 'Training the head').
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import torch

from ..head.config import SDMConfig
from ..head.modeling import SDMHead
from .head_training import RunResult, train_fresh_head

__all__ = [
    "AUTO_CANDIDATES",
    "TRAINING_KEYS",
    "AdmissionEstimate",
    "Candidate",
    "holdout_split",
    "choose_setting",
    "config_fields",
    "check_candidates",
]

# SDMConfig fields "auto" chooses between (neither is best on every feature set: benchmarks/results/efficiency.md)
AUTO_CANDIDATES: tuple[dict, ...] = ({"normalization": "scalar"}, {"normalization": "feature"})
ESTIMATE_DRAWS = 10
# candidate keys that are training settings, not SDMConfig fields
TRAINING_KEYS = ("learning_rate",)


@dataclass
class AdmissionEstimate:
    """A candidate's HR region estimated on held-out training rows.

    ``admitted_share``: mean admitted share of the test halves; ``class_admitted`` / ``class_accuracy``: C
    values pooled over the ``draws`` (accuracy None when none admitted); ``holds``: no class more than 2
    binomial SE (from the per-draw count) below alpha."""

    admitted_share: float
    class_admitted: list[int]
    class_accuracy: list[float | None]
    holds: bool
    draws: int


@dataclass
class Candidate:
    """One trained candidate setting: its config overrides, the run's kept state and estimate."""

    settings: dict
    run: RunResult
    estimate: AdmissionEstimate


def holdout_split(
    labels: torch.Tensor,
    num_classes: int,
    fraction: float,
    generator: torch.Generator,
    rows_name: str = "training rows",
    remedy: str = "add training data or pass procedure='fast'",
):
    """``(kept_rows, held_rows)`` int64 positions in ``labels (N,)``, sorted: per class ``round(fraction * n_c)``
    rows (seeded; at least 2, and 2 left) are held out.

    Raises:
        ValueError: a class has fewer than 4 rows (the message names ``rows_name`` and ``remedy``)."""
    held = []
    for c in range(num_classes):  # a loop over classes, not points
        rows = (labels == c).nonzero().flatten()
        n = rows.numel()
        take = min(max(int(round(fraction * n)), 2), n - 2)
        if take < 2:
            raise ValueError(f"class {c} has {n} {rows_name}: a held-out share needs at least 4 per class; {remedy}")
        held.append(rows[torch.randperm(n, generator=generator)[:take]])
    held_rows = torch.sort(torch.cat(held)).values
    keep = torch.ones(labels.numel(), dtype=torch.bool)
    keep[held_rows] = False
    return keep.nonzero().flatten(), held_rows


@torch.no_grad()
def estimate_admission(
    head: SDMHead, x_held: torch.Tensor, y_held: torch.Tensor, draws: int, generator: torch.Generator
) -> AdmissionEstimate:
    """The HR region of ``head`` (support built) estimated on ``x_held (K, D)``, ``y_held (K,)``: in each of
    ``draws`` random splits one half calibrates and the other is measured (recalibrates ``head``)."""
    num_classes, alpha = head.config.num_classes, head.config.alpha
    admitted = torch.zeros(num_classes, dtype=torch.long)
    correct = torch.zeros(num_classes, dtype=torch.long)
    shares = []
    n = y_held.numel()
    for _ in range(draws):  # a handful of calibration draws, each vectorised
        order = torch.randperm(n, generator=generator)
        part_a, part_b = order[: n // 2], order[n // 2 :]
        if int(torch.bincount(y_held[part_a], minlength=num_classes).min()) < 2:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            head.calibrate(x_held[part_a], y_held[part_a], store_features=False)
        out = head.predict(x_held[part_b])
        y_b = y_held[part_b].cpu()
        admit = out.in_hr
        admitted += torch.bincount(y_b[admit], minlength=num_classes)
        correct += torch.bincount(y_b[admit & (out.prediction == y_b)], minlength=num_classes)
        shares.append(float(admit.float().mean()))
    done = len(shares)
    accuracy: list[float | None] = [
        None if int(a) == 0 else float(c) / float(a) for a, c in zip(admitted, correct, strict=True)
    ]
    holds = done > 0
    for a, acc in zip(admitted.tolist(), accuracy, strict=True):
        if acc is not None:
            per_draw = max(a / done, 1.0)
            if acc < alpha - 2 * math.sqrt(alpha * (1 - alpha) / per_draw):
                holds = False
    return AdmissionEstimate(
        admitted_share=sum(shares) / done if done else 0.0,
        class_admitted=admitted.tolist(),
        class_accuracy=accuracy,
        holds=holds,
        draws=done,
    )


@dataclass
class ChoiceResult:
    """What :func:`choose_setting` returns: the kept candidate, every candidate, and why."""

    chosen: Candidate
    candidates: list[Candidate] = field(default_factory=list)
    reason: str = ""

    def config(self, base: SDMConfig) -> SDMConfig:
        """``base`` with the chosen candidate's config fields."""
        return replace(base, **config_fields(self.chosen.settings))


def config_fields(settings: dict) -> dict:
    """The :class:`SDMConfig` fields of a candidate (all but its training settings)."""
    return {k: v for k, v in settings.items() if k not in TRAINING_KEYS}


def choose_setting(
    base_config: SDMConfig,
    candidates: tuple[dict, ...],
    x_fit: torch.Tensor,
    y_fit: torch.Tensor,
    x_held: torch.Tensor,
    y_held: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    patience: int,
    generator: torch.Generator,
    device: torch.device,
    use_sdm_loss: bool = True,
    on_epoch=None,
    on_run_end=None,
) -> ChoiceResult:
    """Train every candidate on ``x_fit (N, D)``, ``y_fit (N,)``, early-stopped and estimated on ``x_held (K, D)``,
    ``y_held (K,)``, and keep one by the module's rule.

    ``on_epoch(metrics, best)`` runs after every epoch (``metrics["shuffle"]``: the candidate's position);
    ``on_run_end(epochs_run)`` after each candidate."""
    trained: list[Candidate] = []
    for position, settings in enumerate(candidates):
        config = replace(base_config, **config_fields(settings))

        def report(metrics, best, position=position):
            if on_epoch is not None:
                on_epoch({**metrics, "shuffle": position}, best)

        head, run = train_fresh_head(
            config,
            x_fit,
            y_fit,
            x_held,
            y_held,
            generator=generator,
            device=device,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=settings.get("learning_rate", learning_rate),
            patience=patience,
            use_sdm_loss=use_sdm_loss,
            on_epoch=report,
        )
        if on_run_end is not None:
            on_run_end(run.epochs_run)
        head.load_state_dict(run.state)
        head.build_support(x_fit, y_fit)
        estimate = estimate_admission(head, x_held, y_held, ESTIMATE_DRAWS, generator)
        trained.append(Candidate(dict(settings), run, estimate))
    held = [c for c in trained if c.estimate.holds and c.estimate.admitted_share > 0]
    if held:
        chosen = max(held, key=lambda c: (c.estimate.admitted_share, -trained.index(c)))
        reason = "the largest estimated admitted share among the candidates whose region held on held-out rows"
    else:
        chosen = min(trained, key=lambda c: (c.run.loss, trained.index(c)))
        reason = "no candidate's region admitted held-out rows at alpha and held; the lowest held-out loss"
    return ChoiceResult(chosen, trained, reason)


def check_candidates(candidates, config: SDMConfig) -> tuple[dict, ...]:
    """``candidates`` validated as a tuple of dicts of :class:`SDMConfig` fields (not ``input_dim``,
    ``num_classes``, ``id2label``, ``alpha``, ``alphas``) and ``learning_rate``, each built on ``config``.

    Raises:
        TypeError: not a non-empty list, or a field of the wrong type. ValueError: an unknown key or a bad value."""
    if isinstance(candidates, (str, dict)) or not isinstance(candidates, Sequence) or not candidates:
        raise TypeError("candidates must be a non-empty list of dicts of SDMConfig fields")
    fixed = {"input_dim", "num_classes", "id2label", "alpha", "alphas"}
    allowed = ({f.name for f in fields(SDMConfig)} - fixed) | set(TRAINING_KEYS)
    out = []
    for k, item in enumerate(candidates):
        if not isinstance(item, dict) or not set(item) <= allowed:
            raise ValueError(f"candidates[{k}] must be a dict with keys among {sorted(allowed)}, got {item!r}")
        rate = item.get("learning_rate", 1.0)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
            raise ValueError(f"candidates[{k}]: learning_rate must be a positive number, got {rate!r}")
        try:
            replace(config, **config_fields(item))
        except (TypeError, ValueError) as err:
            raise type(err)(f"candidates[{k}]: {err}") from None
        out.append(dict(item))
    return tuple(out)
