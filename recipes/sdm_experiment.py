"""The shared core of the recipes: one SDM head and every baseline on one feature set.

A *feature set* is frozen features of one model for a training split, a calibration split
and any number of labelled test sets (in-distribution or shifted). For each feature set
this module

1. fits the SDM head (``fit_sdm_head``), the CE adaptor (same architecture, plain
   cross-entropy), a linear probe, temperature scaling and the APS / RAPS conformal
   thresholds, all on the same splits;
2. evaluates every estimator on every test set at every alpha of a grid (the SDM head is
   recalibrated per alpha: Algorithm 1 only, no retraining) and returns one summary row per
   (feature set, test set, estimator, alpha) with raw counts per class;
3. explains a few predictions by their nearest training exemplar;
4. optionally runs the resampling check of the HR region's promise (see
   :func:`resample_validity`).

Rows (``summary.json``'s ``"rows"``) are plain JSON::

    {"features": str, "test_set": str, "shifted": bool, "estimator": str, "alpha": float,
     "n": int, "admitted": int, "correct": int,
     "per_class": {label: {"n", "admitted", "correct"}},       # by TRUE label
     "per_prediction": {label: {"n", "admitted", "correct"}},  # by PREDICTED label
     "task": str}

Tables and plots are rendered from rows (:func:`render_tables`), so what is shown and what
is stored cannot disagree.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field

import torch

from sdm_hf import SDMConfig, SDMHead, fit_sdm_head
from sdm_hf.evaluation.metrics import selective_counts, significantly_below
from sdm_hf.head.inference import hr_masks
from sdm_hf.training.baselines import (
    conformal_rule,
    conformal_threshold,
    fit_linear_probe,
    fit_temperature,
    sdm_rules,
    softmax_rule,
)

RAPS_PENALTY, RAPS_K = 0.01, 1

# summary key -> what the tables call it
ESTIMATORS = {
    "probe_softmax": "linear probe: softmax >= alpha",
    "ce_softmax": "CE adaptor: softmax >= alpha",
    "ce_temperature": "CE adaptor + temperature scaling",
    "ce_aps": "CE adaptor + APS singleton",
    "ce_raps": "CE adaptor + RAPS singleton",
    "sdm_softmax": "SDM head: softmax(z') >= alpha",
    "sdm_softmax_d": "SDM head: softmax(d z') >= alpha",
    "sdm_threshold": "SDM head: sdm >= alpha",
    "sdm_hr": "SDM head: HR region",
    "sdm_hr_lower": "SDM head: HR region (lower)",
}
SOFTMAX_TYPE = ("probe_softmax", "ce_softmax", "ce_temperature", "ce_aps", "ce_raps", "sdm_softmax")


@dataclass
class EvalSet:
    """One labelled test set: ``x`` ``[N, D]``, ``y`` ``[N]``, its texts and whether it is shifted."""

    x: torch.Tensor
    y: torch.Tensor
    texts: list[str]
    shifted: bool


@dataclass
class FeatureSet:
    """Frozen features of one model for one task.

    ``train_*`` / ``calib_*``: the SDM head's training and calibration splits (``[N, D]`` and
    ``[N]``); ``tests``: name -> :class:`EvalSet`; ``recipe``: the feature provenance stored in
    the head's config (base model, pooling, layer, max length); ``resplit``: whether the head
    re-splits train and calibration in every shuffle (False when the splits must keep groups
    such as counterfactual pairs apart).
    """

    name: str
    task: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    calib_x: torch.Tensor
    calib_y: torch.Tensor
    tests: dict[str, EvalSet]
    id2label: dict[int, str]
    train_texts: list[str] | None = None
    calib_texts: list[str] | None = None
    recipe: dict = field(default_factory=dict)
    resplit: bool = True
    seconds: float = 0.0  # time spent computing (or loading cached) features


@dataclass
class FitSettings:
    """The SDM head's training settings: a named procedure of ``fit_sdm_head`` ("auto", the
    library's default; "paper": 10 shuffles x 200 epochs at lr 1e-5) and single settings on top
    (None: the procedure's)."""

    epochs: int | None = 60
    shuffles: int | None = 2
    learning_rate: float | None = 1e-5
    seed: int = 0
    progress: bool = True
    procedure: str = "paper"


@dataclass
class Estimators:
    """Everything fitted on one feature set."""

    head: SDMHead
    ce_head: SDMHead
    probe: torch.nn.Module
    temperature: float
    ce_calib_probs: torch.Tensor
    calib_y: torch.Tensor
    alpha: float
    fit_seconds: float
    notes: list[str]


def fit_estimators(fs: FeatureSet, settings: FitSettings, alpha: float) -> Estimators:
    """Fit the SDM head and every baseline on ``fs`` (the baselines use the split the SDM
    head kept, so every estimator sees the same training and calibration points)."""
    started = time.perf_counter()
    config = SDMConfig(
        input_dim=fs.train_x.shape[1], num_classes=len(fs.id2label), alpha=alpha, id2label=fs.id2label, **fs.recipe
    )
    common = dict(
        procedure=settings.procedure,
        epochs=settings.epochs,
        shuffles=settings.shuffles,
        learning_rate=settings.learning_rate,
        seed=settings.seed,
        progress=settings.progress,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        head = fit_sdm_head(
            fs.train_x,
            fs.train_y,
            fs.calib_x,
            fs.calib_y,
            config,
            resplit=fs.resplit,
            train_texts=fs.train_texts,
            calib_texts=fs.calib_texts,
            **common,
        )
    notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    all_x, all_y = torch.cat([fs.train_x, fs.calib_x]), torch.cat([fs.train_y, fs.calib_y])
    sup, cal = head.selection["support_rows"], head.selection["calibration_rows"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ce_head = fit_sdm_head(
            all_x[sup],
            all_y[sup],
            all_x[cal],
            all_y[cal],
            copy.deepcopy(config),
            resplit=False,
            use_sdm_loss=False,
            **{**common, "shuffles": None if settings.procedure == "auto" else 1},
        )
    probe = fit_linear_probe(all_x[sup], all_y[sup], num_classes=len(fs.id2label), seed=settings.seed)
    with torch.no_grad():
        ce_cal_logits = ce_head(all_x[cal])
    temperature = fit_temperature(ce_cal_logits, all_y[cal])
    return Estimators(
        head=head,
        ce_head=ce_head,
        probe=probe,
        temperature=temperature,
        ce_calib_probs=torch.softmax(ce_cal_logits, dim=1),
        calib_y=all_y[cal],
        alpha=alpha,
        fit_seconds=time.perf_counter() - started,
        notes=notes,
    )


def _baseline_decisions(est: Estimators, x: torch.Tensor, alpha: float) -> dict[str, tuple]:
    with torch.no_grad():
        probe_logits = est.probe(x)
        ce_logits = est.ce_head(x)
    ce_probs = torch.softmax(ce_logits, dim=1)
    aps_q = conformal_threshold(est.ce_calib_probs, est.calib_y, alpha)
    raps_q = conformal_threshold(est.ce_calib_probs, est.calib_y, alpha, RAPS_PENALTY, RAPS_K)
    return {
        "probe_softmax": softmax_rule(probe_logits, alpha),
        "ce_softmax": softmax_rule(ce_logits, alpha),
        "ce_temperature": softmax_rule(ce_logits, alpha, est.temperature),
        "ce_aps": conformal_rule(ce_probs, aps_q),
        "ce_raps": conformal_rule(ce_probs, raps_q, RAPS_PENALTY, RAPS_K),
    }


# sdm_hf.training.baselines.sdm_rules' names -> summary keys
SDM_RULE_KEYS = {
    "softmax(z') >= alpha": "sdm_softmax",
    "softmax(d z') >= alpha": "sdm_softmax_d",
    "sdm >= alpha": "sdm_threshold",
    "sdm HR": "sdm_hr",
    "sdm HR lower": "sdm_hr_lower",
}


@torch.no_grad()
def evaluate(fs: FeatureSet, est: Estimators, alphas) -> tuple[list[dict], dict]:
    """Every estimator on every test set at every alpha.

    Returns:
        ``(rows, outputs)``: the summary rows, and the SDM head's outputs per test set at the
        fit's alpha (for plots and explanations). The head is left calibrated at that alpha.
    """
    rows, outputs = [], {}
    for alpha in sorted(set(float(a) for a in alphas) | {est.alpha}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an empty region at some alpha is a result here
            est.head.recalibrate(alpha=alpha)
        for name, test in fs.tests.items():
            out = est.head.predict(test.x)
            if math.isclose(alpha, est.alpha):
                outputs[name] = out
            decisions = _baseline_decisions(est, test.x, alpha)
            decisions.update({SDM_RULE_KEYS[name]: rule for name, rule in sdm_rules(out, alpha).items()})
            for key in ESTIMATORS:
                prediction, admit = decisions[key]
                counts = selective_counts(test.y, prediction, admit, len(fs.id2label), fs.id2label)
                rows.append(
                    {
                        "features": fs.name,
                        "task": fs.task,
                        "test_set": name,
                        "shifted": test.shifted,
                        "estimator": key,
                        "alpha": alpha,
                        **counts,
                    }
                )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.head.recalibrate(alpha=est.alpha)
    return rows, outputs


def explain(fs: FeatureSet, est: Estimators, outputs: dict, per_set: int = 2) -> list[str]:
    """A few predictions per test set (admitted ones first), with the nearest training exemplar."""
    lines = []
    names = fs.id2label
    for name, out in outputs.items():
        test = fs.tests[name]
        admitted = out.in_hr.nonzero().squeeze(1)[: max(1, per_set // 2)]
        rejected = (~out.in_hr).nonzero().squeeze(1)[: per_set - len(admitted)]
        for i in torch.cat([admitted, rejected]).tolist():
            j = int(out.nearest_index[i])
            nearest = est.head.support_texts[j] if (j >= 0 and est.head.support_texts) else None
            nearest_label = names[int(est.head.support.labels[j])] if j >= 0 else "-"
            verdict = "in the HR region" if out.in_hr[i] else ("OOD (q=0)" if out.is_ood[i] else "rejected")
            lines.append(
                f'- [{fs.name} / {name}] "{_clip(test.texts[i])}": label {names[int(test.y[i])]}, predicted '
                f"{names[int(out.prediction[i])]} (sdm={float(out.predicted_probability[i]):.3f}, q={int(out.q[i])}, "
                f"d={float(out.d[i]):.3f}): {verdict}. Nearest training exemplar ({nearest_label}): "
                + (f'"{_clip(nearest)}"' if nearest else f"row {j}")
            )
    return lines


def _clip(text: str, limit: int = 140) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@torch.no_grad()
def resample_validity(
    fs: FeatureSet,
    est: Estimators,
    test_name: str,
    alphas,
    draws: int = 100,
    seed: int = 0,
    progress: bool = False,
) -> list[dict]:
    """The HR region's promise checked on real features by resampling (recalibrating, not
    retraining).

    The in-distribution pool is the head's calibration points plus the in-distribution test
    set ``test_name``. Each draw shuffles the pool (seeded), calibrates a copy of the fitted
    head on the first ``n_calibration`` points (as many as the fit used) and evaluates the HR
    region (and its lower variant) on the rest, at every alpha. Under exchangeability the
    class-conditional accuracy of the admitted points should be >= alpha on average, and
    fall more than two binomial standard errors below alpha in at most ~5% of draws.

    Returns:
        One dict per (alpha, estimator) with, per class, the mean accuracy over draws that
        admitted any point of that class, the share of draws significantly below alpha,
        the mean admitted share and the number of draws with nothing admitted; plus the
        same over "any class".
    """
    from tqdm.auto import tqdm

    head = copy.deepcopy(est.head)
    all_x = torch.cat([fs.train_x, fs.calib_x])
    all_y = torch.cat([fs.train_y, fs.calib_y])
    cal = est.head.selection["calibration_rows"]
    pool_x = torch.cat([all_x[cal], fs.tests[test_name].x])
    pool_y = torch.cat([all_y[cal], fs.tests[test_name].y])
    n_cal = len(cal)
    num_classes = len(fs.id2label)
    generator = torch.Generator().manual_seed(seed)
    alphas = sorted(float(a) for a in alphas)
    # [draw, alpha, variant, class] counts of (n, admitted, correct)
    counts = torch.zeros(draws, len(alphas), 2, num_classes, 3, dtype=torch.long)
    for draw in tqdm(range(draws), desc=f"resampling {fs.name}", disable=not progress):
        order = torch.randperm(pool_x.shape[0], generator=generator)
        c_idx, t_idx = order[:n_cal], order[n_cal:]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            head.calibrate(pool_x[c_idx], pool_y[c_idx], alpha=alphas[0], store_features=False)
        y = pool_y[t_idx]
        # q, d, sdm, q' and the effective sample sizes do not depend on alpha: predict once per
        # draw, then apply each alpha's Algorithm 1 thresholds (and lower-bound margin) to them
        out = head.predict(pool_x[t_idx])
        for a, alpha in enumerate(alphas):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                head.recalibrate(alpha=alpha)
            for v, admit in enumerate(hr_masks(out, alpha, head.q_min, head.thresholds)):
                per_class = selective_counts(y, out.prediction, admit, num_classes)["per_class"].values()
                counts[draw, a, v] = torch.tensor([[g["n"], g["admitted"], g["correct"]] for g in per_class])
    results = []
    for a, alpha in enumerate(alphas):
        for v, variant in enumerate(("sdm_hr", "sdm_hr_lower")):
            c = counts[:, a, v]  # [draws, classes, 3]
            per_class = {}
            for k in range(num_classes):
                n, adm, cor = c[:, k, 0], c[:, k, 1], c[:, k, 2]
                some = adm > 0
                acc = cor[some].double() / adm[some].double()
                below = [significantly_below(int(cr), int(ad), alpha) for cr, ad in zip(cor.tolist(), adm.tolist())]
                per_class[fs.id2label[k]] = {
                    "mean_accuracy": float(acc.mean()) if some.any() else None,
                    "share_significantly_below": sum(below) / draws,
                    "mean_admitted_share": float((adm.double() / n.double().clamp(min=1)).mean()),
                    "draws_with_none_admitted": int((~some).sum()),
                }
            total_n = c[:, :, 0].sum(1).double()
            results.append(
                {
                    "features": fs.name,
                    "task": fs.task,
                    "test_set": test_name,
                    "estimator": variant,
                    "alpha": alpha,
                    "draws": draws,
                    "n_calibration": n_cal,
                    "n_test": pool_x.shape[0] - n_cal,
                    "mean_admitted_share": float((c[:, :, 1].sum(1).double() / total_n).mean()),
                    "share_draws_any_class_below": float(
                        sum(
                            any(
                                significantly_below(int(c[d, k, 2]), int(c[d, k, 1]), alpha) for k in range(num_classes)
                            )
                            for d in range(draws)
                        )
                        / draws
                    ),
                    "per_class": per_class,
                }
            )
    return results
