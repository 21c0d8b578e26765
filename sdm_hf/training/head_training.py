"""One SDM training run of a head: epochs, per-epoch refresh of ``q`` and ``d``, early stopping.

Schmaltz (2025), Similarity-Distance-Magnitude Activations, arXiv:2509.12760: epoch 0 trains with ``q = e - 2``,
``d = 1`` (cross-entropy); after each epoch ``q`` and ``d`` are recomputed against the training rows and the
state of lowest class-balanced SDM loss on the selection rows is kept (derivation: docs/how_sdm_works.md,
section 'Training the head').
"""

from __future__ import annotations

import copy
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..head.config import SDMConfig
from ..head.modeling import SDMHead
from ..maths.activation import SOFTMAX_EQUIVALENT_Q, sdm_loss
from ..maths.distance import class_distance_lists, distance_quantile
from ..maths.similarity import dense_similarity

__all__ = [
    "balanced_sdm_loss",
    "search_space",
    "search_vectors",
    "RunData",
    "RunResult",
    "train_run",
    "train_fresh_head",
    "fit_progress_bar",
    "build_final_head",
]


def balanced_sdm_loss(per_point_loss: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean over classes of the per-class mean of ``per_point_loss (N,)`` (empty classes skipped)."""
    sums = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, per_point_loss.double())
    counts = torch.bincount(labels, minlength=num_classes)
    present = counts > 0
    return float((sums[present] / counts[present]).mean())


def search_space(head: SDMHead) -> torch.Tensor | None:
    """``(D, D)`` float64 ``L`` with ``L L^T = W^T W`` (so ``|L^T v| = |W v|``) when ``4 D <= M``, else None.

    An eigendecomposition, robust where a Cholesky factor fails on a near-singular Gram matrix."""
    weight = head.adaptor.weight.detach().double()  # [M, D]
    if 4 * weight.shape[1] > weight.shape[0]:
        return None
    eigenvalues, eigenvectors = torch.linalg.eigh(weight.T @ weight)
    return eigenvectors * eigenvalues.clamp(min=0).sqrt()


def search_vectors(head: SDMHead, normalized: torch.Tensor, projection: torch.Tensor | None) -> torch.Tensor:
    """``(N, D or M)`` float32 vectors whose pairwise L2 distances equal the exemplars' (the bias cancels)."""
    if projection is None:
        return normalized @ head.adaptor.weight.detach().T
    return (normalized.double() @ projection).float()


class RunData:
    """One run's rows on the training device, normalised once: ``x_train (N, D)`` / ``y_train (N,)`` train
    and form the support set, ``x_select (K, D)`` / ``y_select (K,)`` choose the kept epoch."""

    def __init__(self, head: SDMHead, x_train, y_train, x_select, y_select):
        self.y_train, self.y_select = y_train, y_select
        self.x_train = head.normalize(x_train)
        self.x_select = head.normalize(x_select)
        n = x_train.shape[0]
        self.q_train = torch.full((n,), SOFTMAX_EQUIVALENT_Q, device=x_train.device)
        self.d_train = torch.ones(n, device=x_train.device)


@dataclass
class RunResult:
    """The kept state of one run: the lowest selection loss (ties: the later epoch)."""

    loss: float
    epoch: int
    state: dict[str, torch.Tensor]
    epochs_run: int


@torch.no_grad()
def _refresh(head: SDMHead, data: RunData, num_classes: int, max_q: int) -> dict:
    """Recompute predictions, ``q`` and ``d`` of both parts and the selection metrics with the current weights."""
    logits_train = head.encode(data.x_train)[1]
    logits_select = head.encode(data.x_select)[1]
    pred_train = logits_train.argmax(1).cpu()
    pred_select = logits_select.argmax(1).cpu()
    projection = search_space(head)
    vec_train = search_vectors(head, data.x_train, projection)
    vec_select = search_vectors(head, data.x_select, projection)
    y_train, y_select = data.y_train.cpu(), data.y_select.cpu()
    # one exact dense pass per split: q is the count of rows before the nearest failing row
    own = torch.arange(vec_train.shape[0])
    sim_train = dense_similarity(vec_train, vec_train, pred_train, y_train, pred_train, self_index=own, max_q=max_q)
    sim_select = dense_similarity(vec_select, vec_train, pred_select, y_train, pred_train, max_q=max_q)
    d_train = distance_quantile(
        sim_train.d_nearest, class_distance_lists(sim_train.d_nearest, y_train, sim_train.q, num_classes)
    )
    d_select = distance_quantile(
        sim_select.d_nearest, class_distance_lists(sim_select.d_nearest, y_select, sim_select.q, num_classes)
    )
    device = data.x_train.device
    data.q_train = sim_train.q.float().to(device)
    data.d_train = d_train.to(device)
    select_loss = sdm_loss(logits_select.float().cpu(), y_select, sim_select.q.float(), d_select, reduction="none")
    return {
        "calibration_loss": balanced_sdm_loss(select_loss, y_select, num_classes),
        "train_accuracy": float((pred_train == y_train).float().mean()),
        "calibration_accuracy": float((pred_select == y_select).float().mean()),
        "calibration_ood_fraction": float((sim_select.q == 0).float().mean()),
        "calibration_mean_q": float(sim_select.q.float().mean()),
        "calibration_mean_d": float(d_select.mean()),
    }


@torch.no_grad()
def _cross_entropy_metrics(head: SDMHead, data: RunData, num_classes: int) -> dict:
    """Selection metrics of the cross-entropy baseline (no neighbour search)."""
    logits = head.encode(data.x_select)[1].float()
    y = data.y_select
    loss = torch.nn.functional.cross_entropy(logits, y, reduction="none").cpu()
    train_pred = head.encode(data.x_train)[1].argmax(1)
    return {
        "calibration_loss": balanced_sdm_loss(loss, y.cpu(), num_classes),
        "train_accuracy": float((train_pred == data.y_train).float().mean()),
        "calibration_accuracy": float((logits.argmax(1) == y).float().mean()),
    }


def _train_one_epoch(head: SDMHead, data: RunData, optimizer, batch_size: int, generator) -> float:
    """One pass over the training rows in seeded random minibatches; mean minibatch loss."""
    head.train()
    n = data.x_train.shape[0]
    order = torch.randperm(n, generator=generator).to(data.x_train.device)
    total, batches = torch.zeros((), device=data.x_train.device), 0
    for start in range(0, n, batch_size):  # minibatches, not points
        rows = order[start : start + batch_size]
        logits = head.encode(data.x_train[rows])[1]
        loss = sdm_loss(logits, data.y_train[rows], data.q_train[rows], data.d_train[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
        batches += 1
    head.eval()
    return float(total) / max(batches, 1)


def train_run(
    head: SDMHead,
    data: RunData,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    patience: int,
    generator: torch.Generator,
    use_sdm_loss: bool = True,
    on_epoch: Callable[[dict, RunResult], None] | None = None,
    keep_last: bool = False,
) -> RunResult:
    """Train ``head`` in place for up to ``epochs`` epochs and return its best state.

    Args:
        head: a freshly initialised head with its normalisation set.
        data: the run's training and selection rows.
        epochs: the most epochs (epoch 0 is plain cross-entropy).
        batch_size: minibatch size; learning_rate: Adam's (no weight decay).
        patience: stop after this many epochs without a lower selection loss (0: never).
        generator: seeds the minibatch orders.
        use_sdm_loss: False trains and selects with plain cross-entropy (``q = e - 2``, ``d = 1``).
        on_epoch: called after each epoch with its metrics (``epoch``, ``train_loss``, ``calibration_loss``
            = selection loss, accuracies, ``seconds``) and the best :class:`RunResult` so far.
        keep_last: return the last epoch's state instead of the best.

    Returns:
        The :class:`RunResult` of the lowest selection loss (ties: the later epoch).

    Raises:
        ValueError: the loss or weights became non-finite, or ``epochs < 1``.
    """
    config = head.config
    optimizer = torch.optim.Adam(head.parameters(), lr=learning_rate, weight_decay=0.0, fused=True)
    best: RunResult | None = None
    run_best, since_best, epochs_run = math.inf, 0, 0
    for epoch in range(epochs):
        started = time.perf_counter()
        train_loss = _train_one_epoch(head, data, optimizer, batch_size, generator)
        if not (math.isfinite(train_loss) and all(bool(torch.isfinite(p).all()) for p in head.parameters())):
            raise ValueError(
                f"training diverged in epoch {epoch + 1}: the loss or the head's weights are no longer finite "
                f"(learning_rate={learning_rate}); lower learning_rate, or check the features for huge values"
            )
        if use_sdm_loss:
            metrics = _refresh(head, data, config.num_classes, config.max_q)
        else:
            metrics = _cross_entropy_metrics(head, data, config.num_classes)
        metrics.update(epoch=epoch, train_loss=train_loss, seconds=time.perf_counter() - started)
        epochs_run = epoch + 1
        if best is None or keep_last or metrics["calibration_loss"] <= best.loss:
            state = {k: v.detach().clone() for k, v in head.state_dict().items()}
            best = RunResult(metrics["calibration_loss"], epoch, state, epochs_run)
        best.epochs_run = epochs_run
        if on_epoch is not None:
            on_epoch(metrics, best)
        if metrics["calibration_loss"] < run_best:
            run_best, since_best = metrics["calibration_loss"], 0
        else:
            since_best += 1
        if patience and since_best >= patience:  # early stopping: this run stopped improving
            break
    if best is None:
        raise ValueError("no epoch was trained; pass epochs >= 1")
    return best


def train_fresh_head(
    config: SDMConfig,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_select: torch.Tensor,
    y_select: torch.Tensor,
    *,
    generator: torch.Generator,
    device: torch.device,
    **run_settings,
) -> tuple[SDMHead, RunResult]:
    """A head initialised from ``generator``, normalised with ``x_train (N, D)``'s statistics and trained by
    :func:`train_run` (``run_settings``), ``(x_select, y_select)`` selecting. Returns ``(head, run)``; the
    head holds the last epoch's weights, ``run.state`` the kept ones."""
    head = SDMHead(copy.deepcopy(config), generator=generator).to(device)
    head.set_normalization(*SDMHead.normalization_statistics(x_train.cpu(), config.normalization))
    data = RunData(head, x_train.to(device), y_train.to(device), x_select.to(device), y_select.to(device))
    return head, train_run(head, data, generator=generator, **run_settings)


class _LineStream:
    """A tqdm stream that ends each status with a newline, so a log gets one line per update."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def fit_progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    """One tqdm bar over a whole fit (``total`` epochs at most); in a log (stderr not a TTY) one line per 30 s."""
    if not enabled:
        return tqdm(total=total, disable=True)
    stream = sys.stderr
    if hasattr(stream, "isatty") and stream.isatty():
        return tqdm(total=total, desc=desc, unit="epoch", file=stream)
    return tqdm(
        total=total,
        desc=desc,
        unit="epoch",
        file=_LineStream(stream),
        mininterval=30,
        ascii=True,
        bar_format="{desc}: {n}/{total} epochs at most, {elapsed} elapsed, up to {remaining} left{postfix}",
    )


def build_final_head(
    config: SDMConfig,
    state: dict[str, torch.Tensor],
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    calib_x: torch.Tensor,
    calib_y: torch.Tensor,
    *,
    device: torch.device,
    ids: list | None = None,
    texts: list | None = None,
    ood_x: torch.Tensor | None = None,
    stacklevel: int = 3,
) -> SDMHead:
    """The returned head of a fit: ``state``'s weights, support ``(support_x, support_y)`` plus ``ood_x`` as
    label -1, calibrated on ``(calib_x, calib_y)``; an empty-region warning is re-issued ``stacklevel`` up."""
    final = SDMHead(copy.deepcopy(config)).to(device)
    final.load_state_dict(state)
    final.build_support(support_x, support_y, ids=ids, texts=texts)
    if ood_x is not None:  # known OOD rows join the support before calibration
        n_ood = ood_x.shape[0]
        final.add_to_support(
            ood_x,
            ids=None if ids is None else [None] * n_ood,
            texts=None if texts is None else [""] * n_ood,
            ood=True,
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        final.calibrate(calib_x, calib_y)
    for w in caught:  # re-issued so that the warning points at the caller of fit_sdm_head
        warnings.warn(w.message, w.category, stacklevel=stacklevel + 1)
    return final
