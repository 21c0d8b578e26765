"""Baseline selective classifiers to compare SDM heads against, each ending in ``(prediction (N,), admit (N,) bool)``.

The comparisons of Schmaltz (2025), Similarity-Distance-Magnitude Activations, arXiv:2509.12760, for
:func:`sdm_hf.evaluation.metrics.selective_classification_report`: a linear probe and the CE adaptor
(``fit_sdm_head(..., use_sdm_loss=False)``) with :func:`softmax_rule`, temperature scaling (Guo et al., 2017),
APS (Romano et al., 2020) and RAPS (Angelopoulos et al., 2021) singleton sets (non-randomised), and the SDM
head's own partial rules (:func:`sdm_rules`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ..head.inference import SDMOutput

__all__ = [
    "softmax_rule",
    "fit_linear_probe",
    "fit_temperature",
    "conformal_scores",
    "conformal_threshold",
    "conformal_sets",
    "conformal_rule",
    "sdm_rules",
]


def softmax_rule(logits: torch.Tensor, alpha: float, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prediction (N,), admit (N,) bool)``: ``argmax`` and ``max softmax(logits / T) >= alpha`` for
    ``logits (N, C)`` and ``T = temperature > 0``."""
    p = torch.softmax(logits.float() / temperature, dim=1)
    confidence, prediction = p.max(dim=1)
    return prediction, confidence >= alpha


def fit_linear_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    epochs: int = 200,
    learning_rate: float = 1e-2,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """Linear softmax classifier on standardised ``x (N, D)``, labels ``y (N,)``, full-batch Adam on the
    cross-entropy. Returns a module (eval mode) mapping ``(N, D)`` features to ``(N, C)`` logits."""
    x = torch.as_tensor(x).float()
    y = torch.as_tensor(y).long()
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        bound = 1 / math.sqrt(x.shape[1])
        linear.weight.uniform_(-bound, bound, generator=generator)
        linear.bias.zero_()
    model = nn.Sequential(_Standardize(mean, std), linear)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    for _ in range(epochs):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


class _Standardize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x):
        return (x - self.mean) / self.std


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """Temperature ``T > 0`` minimising the NLL of ``softmax(logits / T)`` on held-out ``logits (N, C)``,
    ``labels (N,)`` (LBFGS on ``log T``)."""
    logits = torch.as_tensor(logits).detach().double()
    labels = torch.as_tensor(labels).long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def conformal_scores(probabilities: torch.Tensor, penalty: float = 0.0, k_reg: int = 1) -> torch.Tensor:
    """Non-conformity score of every class: the mass of the classes ranked at or above it (APS), plus
    ``penalty * max(0, rank - k_reg)`` (RAPS, 1-based rank; ``penalty = 0`` is APS).

    Args:
        probabilities: ``(N, C)`` class probabilities (rows sum to 1).

    Returns:
        ``(N, C)`` float64 scores; lower means more conforming.
    """
    p = probabilities.double()
    order = torch.argsort(p, dim=1, descending=True, stable=True)
    sorted_p = p.gather(1, order)
    cumulative = sorted_p.cumsum(dim=1)
    ranks = torch.arange(1, p.shape[1] + 1, dtype=torch.float64).expand_as(p)
    sorted_scores = cumulative + penalty * (ranks - k_reg).clamp(min=0)
    scores = torch.empty_like(sorted_scores)
    scores.scatter_(1, order, sorted_scores)
    return scores


def conformal_threshold(
    probabilities: torch.Tensor, labels: torch.Tensor, alpha: float, penalty: float = 0.0, k_reg: int = 1
) -> float:
    """Split-conformal threshold at coverage ``alpha``: the ``ceil((n + 1) alpha)``-th smallest true-class
    score of calibration ``probabilities (n, C)``, ``labels (n,)`` (``inf`` when ``n`` is too small)."""
    scores = conformal_scores(probabilities, penalty, k_reg).gather(1, torch.as_tensor(labels).long().view(-1, 1))
    scores = torch.sort(scores.squeeze(1)).values
    rank = math.ceil((scores.numel() + 1) * alpha)
    return math.inf if rank > scores.numel() else float(scores[rank - 1])


def conformal_sets(probabilities: torch.Tensor, threshold: float, penalty: float = 0.0, k_reg: int = 1) -> torch.Tensor:
    """``(N, C)`` bool prediction-set membership for ``probabilities (N, C)`` and a :func:`conformal_threshold`."""
    return conformal_scores(probabilities, penalty, k_reg) <= threshold


def conformal_rule(
    probabilities: torch.Tensor, threshold: float, penalty: float = 0.0, k_reg: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prediction (N,), admit (N,) bool)``: ``argmax`` and "the set is exactly {argmax}"."""
    sets = conformal_sets(probabilities, threshold, penalty, k_reg)
    prediction = probabilities.argmax(dim=1)
    singleton = (sets.sum(dim=1) == 1) & sets.gather(1, prediction.view(-1, 1)).squeeze(1)
    return prediction, singleton


def sdm_rules(output: SDMOutput, alpha: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The SDM head's own rules on an :class:`~sdm_hf.SDMOutput`: ``softmax(z')``, ``softmax(d z')`` and
    ``sdm`` at least ``alpha``, HR and HR lower, as name -> ``(argmax z' (N,), admit (N,) bool)``."""
    z = output.logits.float()
    pred = output.prediction
    return {
        "softmax(z') >= alpha": softmax_rule(z, alpha),
        "softmax(d z') >= alpha": (
            pred,
            torch.softmax(z * output.d.view(-1, 1), dim=1).gather(1, pred.view(-1, 1)).squeeze(1) >= alpha,
        ),
        "sdm >= alpha": (pred, output.predicted_probability >= alpha),
        "sdm HR": (pred, output.in_hr),
        "sdm HR lower": (pred, output.in_hr_lower),
    }
