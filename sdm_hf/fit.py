"""``fit_sdm_head``: J shuffles x E epochs of SDM training, selection and calibration.

The training procedure of Schmaltz (2025), *Similarity-Distance-Magnitude Activations*
(arXiv:2509.12760): the head is trained with the SDM loss (cross-entropy of the change-of-base
activation ``sdm(z')``, whose base ``2 + q`` and exponent scale ``d`` come from the current
support set), and the state with the lowest calibration loss is kept.

Per shuffle: (optionally) merge and re-split the data 50/50, fresh initialisation, Adam.
Epoch 0 is plain cross-entropy (``q = e - 2``, ``d = 1``); after every epoch the support
index is rebuilt and ``q``, ``d`` are recomputed for both splits with the new weights, and
the next epoch trains with them. The state with the lowest class-balanced calibration SDM
loss over all shuffles and epochs is kept (in memory; ties go to the later one), then the
final head is built and calibrated on that state's own split.

Which settings keep the HR region's promise: the learning rate, the number of epochs and
shuffles, early stopping and the batch size only change *which* weights are proposed; the
kept state is still the one of lowest calibration loss, and the final head is calibrated by
Algorithm 1 on that state's calibration rows, exactly as in the paper. So all of them leave
the calibration logic untouched. ``selection_fraction > 0`` goes one step further than the
paper: it keeps the rows that choose the state apart from the rows that calibrate, so the
latter are not used twice.

Speed: during training, distances are searched in the D-dimensional space ``L^T x`` with
``L L^T = W^T W`` when ``D < M`` (squared distances ``|W(x - x')|^2 = |L^T (x - x')|^2``,
and the adaptor bias cancels), which gives the exemplar-space distances at
``D / M`` of the cost; normalised features are computed once per shuffle.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from . import validation as check
from .activation import SOFTMAX_EQUIVALENT_Q, sdm_loss
from .distance import class_distance_lists, distance_quantile
from .head.config import SDMConfig
from .head.modeling import SDMHead
from .index import SupportIndex, resolve_device
from .similarity import compute_similarity
from .validation import FeaturesLike, LabelsLike

__all__ = ["fit_sdm_head", "balanced_sdm_loss", "PROCEDURES"]

# Named training procedures: the settings fit_sdm_head uses for every argument left at None.
PROCEDURES: dict[str, dict] = {
    # Schmaltz (2025): J = 10 shuffles x E = 200 epochs, Adam lr 1e-5, minibatches of 50, the
    # state of lowest calibration SDM loss over all epochs and shuffles, no early stopping
    "paper": dict(epochs=200, shuffles=10, batch_size=50, learning_rate=1e-5, patience=0, selection_fraction=0.0),
    # Adam lr 1e-3 with early stopping (benchmarks/efficiency.py): a fraction of the cost; the
    # kept state is still the one of lowest calibration SDM loss, and Algorithm 1 is unchanged
    "fast": dict(epochs=100, shuffles=2, batch_size=50, learning_rate=1e-3, patience=10, selection_fraction=0.0),
}

_MAX_SPLIT_DRAWS = 100


def balanced_sdm_loss(per_point_loss: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean over classes of the per-class mean loss (classes with no point are
    skipped)."""
    sums = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, per_point_loss.double())
    counts = torch.bincount(labels, minlength=num_classes)
    present = counts > 0
    return float((sums[present] / counts[present]).mean())


def _search_space(head: SDMHead) -> torch.Tensor | None:
    """``[D, D]`` matrix ``L`` with ``|L^T v| = |W v|`` when it pays, else None.

    Uses an eigendecomposition of ``W^T W`` (robust where a Cholesky factor would fail on a
    near-singular Gram matrix). The Gram matrix, its decomposition and the projection cost
    O(M D^2 + D^3) per epoch, so searching in D dimensions only pays when D is well below M:
    measured here (1,000 points, M = 1000) it is faster up to D = 128 and slower from
    D = 256 on (75 vs 39 ms per epoch at D = 512), hence the rule ``4 D <= M``."""
    weight = head.adaptor.weight.detach().double()  # [M, D]
    if 4 * weight.shape[1] > weight.shape[0]:
        return None
    eigenvalues, eigenvectors = torch.linalg.eigh(weight.T @ weight)
    return eigenvectors * eigenvalues.clamp(min=0).sqrt()


def _search_vectors(head: SDMHead, normalized: torch.Tensor, projection: torch.Tensor | None) -> torch.Tensor:
    """Vectors whose pairwise L2 distances equal the exemplars' (the bias cancels)."""
    if projection is None:
        return normalized @ head.adaptor.weight.detach().T
    return (normalized.double() @ projection).float()


def _draw_split(n_total, labels, num_classes, generator):
    """50/50 split of the merged data (odd element to calibration) with >= 2 points of
    every class on each side; redrawn (seeded) when a side comes up short."""
    half = n_total // 2
    for _ in range(_MAX_SPLIT_DRAWS):
        perm = torch.randperm(n_total, generator=generator)
        train_idx, calib_idx = perm[:half], perm[half:]
        if all(int(torch.bincount(labels[part], minlength=num_classes).min()) >= 2 for part in (train_idx, calib_idx)):
            return train_idx, calib_idx
    raise ValueError(
        "could not split the merged data 50/50 with at least 2 points of every class on each "
        "side; add data for the rare classes or pass resplit=False"
    )


def _split_selection(calib_idx, labels, num_classes, fraction, generator):
    """``(selection_idx, calibration_idx)``: per class, ``round(fraction * n_c)`` of the
    calibration rows (seeded; at least 2, and at least 2 left) choose the kept state, the rest
    are Algorithm 1's calibration set. ``fraction == 0``: both are ``calib_idx`` (no draw)."""
    if fraction == 0:
        return calib_idx, calib_idx
    y = labels[calib_idx]
    chosen = []
    for c in range(num_classes):  # a loop over classes, not points
        rows = calib_idx[y == c]
        n = rows.numel()
        take = min(max(int(round(fraction * n)), 2), n - 2)
        if take < 2:
            raise ValueError(
                f"class {c} has {n} calibration points: a selection split needs at least 4 per class; "
                "add calibration data or pass selection_fraction=0"
            )
        chosen.append(rows[torch.randperm(n, generator=generator)[:take]])
    selection = torch.sort(torch.cat(chosen)).values
    keep = ~torch.isin(calib_idx, selection)
    return selection, calib_idx[keep]


class _Shuffle:
    """One shuffle's data on the training device, normalised once."""

    def __init__(self, head, x_train, y_train, x_calib, y_calib):
        self.y_train, self.y_calib = y_train, y_calib
        self.x_train = head.normalize(x_train)
        self.x_calib = head.normalize(x_calib)
        n = x_train.shape[0]
        self.q_train = torch.full((n,), SOFTMAX_EQUIVALENT_Q, device=x_train.device)
        self.d_train = torch.ones(n, device=x_train.device)
        # the previous refresh's q per point: it predicts this epoch's run lengths, so each
        # row's first search can be about as wide as it will need (fewer widening passes)
        self.last_q_train: torch.Tensor | None = None
        self.last_q_calib: torch.Tensor | None = None


def _first_widths(last_q: torch.Tensor | None, default: int) -> int | torch.Tensor:
    """Per-row first search widths: the power of two >= 2 (q + 1), at least 8."""
    if last_q is None:
        return default
    wanted = (2 * (last_q + 1)).clamp(min=8).double()
    return torch.pow(2.0, torch.ceil(torch.log2(wanted))).long()


@torch.no_grad()
def _refresh(head: SDMHead, data: _Shuffle, num_classes: int, max_q: int, initial_k: int) -> dict:
    """Recompute exemplars/predictions, the support index, q, d for both splits and the
    calibration loss with the current weights (after every epoch)."""
    logits_train = head.encode(data.x_train)[1]
    logits_calib = head.encode(data.x_calib)[1]
    pred_train = logits_train.argmax(1).cpu()
    pred_calib = logits_calib.argmax(1).cpu()
    projection = _search_space(head)
    vec_train = _search_vectors(head, data.x_train, projection)
    vec_calib = _search_vectors(head, data.x_calib, projection)
    y_train, y_calib = data.y_train.cpu(), data.y_calib.cpu()
    index = SupportIndex(vec_train, y_train, pred_train, device=vec_train.device)
    own = torch.arange(vec_train.shape[0])
    sim_train = compute_similarity(
        index,
        vec_train,
        pred_train,
        y_train,
        pred_train,
        self_index=own,
        max_q=max_q,
        initial_k=_first_widths(data.last_q_train, initial_k),
    )
    sim_calib = compute_similarity(
        index,
        vec_calib,
        pred_calib,
        y_train,
        pred_train,
        max_q=max_q,
        initial_k=_first_widths(data.last_q_calib, initial_k),
    )
    data.last_q_train, data.last_q_calib = sim_train.q, sim_calib.q
    d_train = distance_quantile(
        sim_train.d_nearest, class_distance_lists(sim_train.d_nearest, y_train, sim_train.q, num_classes)
    )
    d_calib = distance_quantile(
        sim_calib.d_nearest, class_distance_lists(sim_calib.d_nearest, y_calib, sim_calib.q, num_classes)
    )
    device = data.x_train.device
    data.q_train = sim_train.q.float().to(device)
    data.d_train = d_train.to(device)
    calib_loss = sdm_loss(logits_calib.float().cpu(), y_calib, sim_calib.q.float(), d_calib, reduction="none")
    return {
        "calibration_loss": balanced_sdm_loss(calib_loss, y_calib, num_classes),
        "train_accuracy": float((pred_train == y_train).float().mean()),
        "calibration_accuracy": float((pred_calib == y_calib).float().mean()),
        "calibration_ood_fraction": float((sim_calib.q == 0).float().mean()),
        "calibration_mean_q": float(sim_calib.q.float().mean()),
        "calibration_mean_d": float(d_calib.mean()),
    }


def fit_sdm_head(
    train_x: FeaturesLike,
    train_y: LabelsLike,
    calib_x: FeaturesLike,
    calib_y: LabelsLike,
    config: SDMConfig | None = None,
    *,
    procedure: str = "paper",
    epochs: int | None = None,
    shuffles: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    resplit: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
    train_ids: list | None = None,
    calib_ids: list | None = None,
    train_texts: list | None = None,
    calib_texts: list | None = None,
    use_sdm_loss: bool = True,
    ood_x: FeaturesLike | None = None,
    patience: int | None = None,
    selection_fraction: float | None = None,
) -> SDMHead:
    """Train, select and calibrate an SDM head over frozen features.

    Args:
        train_x: ``[N_train, D]`` training features (tensor or ndarray).
        train_y: ``[N_train]`` integer labels ``0..C-1``.
        calib_x: ``[N_calib, D]`` calibration features.
        calib_y: ``[N_calib]`` labels.
        config: the head's :class:`SDMConfig`; by default ``input_dim = D`` and
            ``num_classes = max label + 1`` with the papers' other defaults.
        procedure: the named settings (:data:`PROCEDURES`) used for every one of ``epochs``,
            ``shuffles``, ``batch_size``, ``learning_rate``, ``patience`` and
            ``selection_fraction`` left at None. ``"paper"`` is Schmaltz (2025)'s procedure
            (J = 10 x E = 200, lr 1e-5, no early stopping); ``"fast"`` (Adam lr 1e-3,
            J = 2 x E <= 100, early stopping after 10 epochs without a better calibration loss)
            costs 1-5% of it. Measured on the shipped real feature sets
            (``benchmarks/efficiency.py``, 2 splits, 100 recalibration draws each), ``"fast"``
            admitted 1.3-6x as many held-out points at alpha = 0.90 with the class-conditional
            accuracy intact, but at alpha = 0.95 its regions were a few dozen points and the
            draws fell below alpha too often (up to 21% of them by more than 2 SE; with
            ``SDMConfig(min_class_points="auto")`` at most 1-5%, the tiny regions emptied),
            so ``"paper"`` stays the default. Check ``"fast"`` on your own features at your
            alpha (``head.calibration_report()`` and held-out recalibration draws).
        epochs: E, epochs per shuffle (epoch 0 is plain cross-entropy).
        shuffles: J, independent restarts; the best state over all of them is kept.
        batch_size: minibatch size.
        learning_rate: Adam learning rate (no weight decay).
        patience: early stopping: a shuffle ends after this many epochs without a lower
            calibration loss than its best so far (0 runs all E epochs).
        selection_fraction: in ``[0, 1)``; per class, this share of each shuffle's calibration
            rows (seeded, at least 2) chooses the kept state (epoch and shuffle) and only the
            rest calibrate the HR region with Algorithm 1. 0 (the papers' procedure) uses the
            same rows for both. A positive share costs calibration points but makes the
            calibration rows play no part in choosing the weights, so they stay exchangeable
            with new data given the kept state: the setting in which the region's
            finite-sample guarantee is argued.
        resplit: True merges train and calibration and re-splits them 50/50 in every
            shuffle (seeded; the odd element goes to calibration); False keeps the split.
        seed: seeds the splits, initialisations and minibatch orders (fully reproducible).
        device: ``None``/``"cpu"`` or ``"cuda"``; the returned head lives there.
        progress: show a tqdm bar over shuffles x epochs.
        callback: called after every epoch with that epoch's metrics dict.
        train_ids, calib_ids, train_texts, calib_texts: optional per-row document ids /
            texts; those of the rows that end up in the support set are stored for
            explanations.
        use_sdm_loss: False trains the same architecture with plain cross-entropy
            (``q = e - 2``, ``d = 1`` throughout, no per-epoch neighbour search) and selects
            on the balanced calibration cross-entropy: the "CE adaptor" baseline. The
            returned head is still built and calibrated, so its SDM outputs exist too.
        ood_x: ``[K, D]`` known out-of-distribution points (e.g. inputs the head must never
            admit): added to the final support set with the label -1 before calibration, so a
            query whose nearest exemplar is one of them has ``q = 0`` (OOD).

    Returns:
        A calibrated :class:`SDMHead`. ``head.training_history`` is the list of per-epoch
        metric dicts (shuffle, epoch, train_loss, calibration_loss, accuracies, OOD
        fraction, mean q and d, seconds); ``head.selection`` says which state was kept.

    Example:
        >>> import torch
        >>> from sdm_hf import SDMConfig, fit_sdm_head
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(200, 4, generator=g); y = (x[:, 0] > 0).long()
        >>> head = fit_sdm_head(x[:100], y[:100], x[100:], y[100:],
        ...                     SDMConfig(input_dim=4, exemplar_dim=8, alpha=0.9),
        ...                     epochs=3, shuffles=1, learning_rate=1e-3, progress=False)
        >>> len(head.training_history)
        3
    """
    settings = _procedure_settings(
        procedure,
        epochs=epochs,
        shuffles=shuffles,
        batch_size=batch_size,
        learning_rate=learning_rate,
        patience=patience,
        selection_fraction=selection_fraction,
    )
    epochs, shuffles = settings["epochs"], settings["shuffles"]
    batch_size, learning_rate = settings["batch_size"], settings["learning_rate"]
    patience, selection_fraction = settings["patience"], settings["selection_fraction"]
    train_x = check.as_features(train_x, "train_x")
    calib_x = check.as_features(calib_x, "calib_x", train_x.shape[1])
    if config is None:
        num_classes = int(torch.as_tensor(train_y).max()) + 1 if len(train_y) else 2
        config = SDMConfig(input_dim=train_x.shape[1], num_classes=max(num_classes, 2))
    if not isinstance(config, SDMConfig):
        raise TypeError(f"config must be an SDMConfig, got {type(config).__name__}")
    if train_x.shape[1] != config.input_dim:
        raise ValueError(f"train_x has {train_x.shape[1]} features but config.input_dim={config.input_dim}")
    num_classes = config.num_classes
    train_y = check.as_labels(train_y, "train_y", num_classes, length=train_x.shape[0])
    calib_y = check.as_labels(calib_y, "calib_y", num_classes, length=calib_x.shape[0])
    check.check_class_counts(train_y, "train_y", num_classes)
    check.check_class_counts(calib_y, "calib_y", num_classes)
    epochs = check.check_positive_int(epochs, "epochs")
    shuffles = check.check_positive_int(shuffles, "shuffles")
    batch_size = check.check_positive_int(batch_size, "batch_size")
    if not (isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be a positive number, got {learning_rate!r}")
    if patience != 0:
        patience = check.check_positive_int(patience, "patience (0 disables early stopping)")
    if not (isinstance(selection_fraction, (int, float)) and 0 <= selection_fraction < 1):
        raise ValueError(f"selection_fraction must be a number in [0, 1), got {selection_fraction!r}")
    ids = _merge_optional(train_ids, calib_ids, "train_ids", "calib_ids", train_x.shape[0], calib_x.shape[0])
    texts = _merge_optional(train_texts, calib_texts, "train_texts", "calib_texts", train_x.shape[0], calib_x.shape[0])
    device = resolve_device(device)

    all_x = torch.cat([train_x, calib_x])
    all_y = torch.cat([train_y, calib_y])
    n_train = train_x.shape[0]
    generator = torch.Generator().manual_seed(int(seed))
    history: list[dict] = []
    best: dict | None = None
    bar = tqdm(total=shuffles * epochs, desc="fit_sdm_head", unit="epoch", disable=not progress)
    try:
        for shuffle in range(shuffles):
            if resplit:
                train_idx, calib_idx = _draw_split(all_x.shape[0], all_y, num_classes, generator)
            else:
                train_idx = torch.arange(n_train)
                calib_idx = torch.arange(n_train, all_x.shape[0])
            select_idx, calib_idx = _split_selection(calib_idx, all_y, num_classes, selection_fraction, generator)
            x_tr, y_tr = all_x[train_idx].to(device), all_y[train_idx].to(device)
            x_ca, y_ca = all_x[select_idx].to(device), all_y[select_idx].to(device)
            head = SDMHead(copy.deepcopy(config), generator=generator).to(device)
            head.set_normalization(*SDMHead.normalization_statistics(x_tr.cpu(), config.normalization))
            data = _Shuffle(head, x_tr, y_tr, x_ca, y_ca)
            optimizer = torch.optim.Adam(head.parameters(), lr=learning_rate, weight_decay=0.0, fused=True)
            shuffle_best, since_best = math.inf, 0
            for epoch in range(epochs):
                started = time.perf_counter()
                train_loss = _train_one_epoch(head, data, optimizer, batch_size, generator)
                if use_sdm_loss:
                    metrics = _refresh(head, data, num_classes, config.max_q, config.initial_k)
                else:
                    metrics = _cross_entropy_metrics(head, data, num_classes)
                metrics.update(shuffle=shuffle, epoch=epoch, train_loss=train_loss)
                metrics["seconds"] = time.perf_counter() - started
                if best is None or metrics["calibration_loss"] <= best["calibration_loss"]:
                    best = {
                        "calibration_loss": metrics["calibration_loss"],
                        "shuffle": shuffle,
                        "epoch": epoch,
                        "state": {k: v.detach().clone() for k, v in head.state_dict().items()},
                        "train_idx": train_idx,
                        "calib_idx": calib_idx,
                        "select_idx": select_idx,
                    }
                history.append(metrics)
                if callback is not None:
                    callback(dict(metrics))
                bar.update(1)
                bar.set_postfix(
                    shuffle=shuffle, loss=f"{metrics['calibration_loss']:.4f}", best=f"{best['calibration_loss']:.4f}"
                )
                if metrics["calibration_loss"] < shuffle_best:
                    shuffle_best, since_best = metrics["calibration_loss"], 0
                else:
                    since_best += 1
                if patience and since_best >= patience:  # early stopping: this shuffle stopped improving
                    bar.update(epochs - 1 - epoch)
                    break
    finally:
        bar.close()

    if best is None:  # epochs >= 1 and shuffles >= 1 are validated above: unreachable in practice
        raise ValueError("no epoch was trained; pass epochs >= 1 and shuffles >= 1")
    final = SDMHead(copy.deepcopy(config)).to(device)
    final.load_state_dict(best["state"])
    train_idx, calib_idx = best["train_idx"], best["calib_idx"]
    final.build_support(
        all_x[train_idx],
        all_y[train_idx],
        ids=None if ids is None else [ids[i] for i in train_idx.tolist()],
        texts=None if texts is None else [texts[i] for i in train_idx.tolist()],
    )
    if ood_x is not None:  # known OOD rows join the support before calibration (q = 0 next to them)
        n_ood = check.as_features(ood_x, "ood_x", train_x.shape[1]).shape[0]
        final.add_to_support(
            ood_x,
            ids=None if ids is None else [None] * n_ood,
            texts=None if texts is None else [""] * n_ood,
            ood=True,
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        final.calibrate(all_x[calib_idx], all_y[calib_idx])
    for w in caught:  # re-issued so that the warning points at the caller of fit_sdm_head
        warnings.warn(w.message, w.category, stacklevel=2)
    final.training_history = history
    final.selection = {
        "shuffle": best["shuffle"],
        "epoch": best["epoch"],
        "calibration_loss": best["calibration_loss"],
        "support_rows": train_idx.clone(),
        "calibration_rows": calib_idx.clone(),
        "selection_rows": best["select_idx"].clone(),
        "procedure": procedure,
        "settings": settings,
    }
    return final


@torch.no_grad()
def _cross_entropy_metrics(head: SDMHead, data: _Shuffle, num_classes: int) -> dict:
    """Selection metrics of the cross-entropy baseline (no neighbour search)."""
    logits = head.encode(data.x_calib)[1].float()
    y = data.y_calib
    loss = torch.nn.functional.cross_entropy(logits, y, reduction="none").cpu()
    train_pred = head.encode(data.x_train)[1].argmax(1)
    return {
        "calibration_loss": balanced_sdm_loss(loss, y.cpu(), num_classes),
        "train_accuracy": float((train_pred == data.y_train).float().mean()),
        "calibration_accuracy": float((logits.argmax(1) == y).float().mean()),
    }


def _train_one_epoch(head, data: _Shuffle, optimizer, batch_size: int, generator) -> float:
    """One pass over the training split in seeded random minibatches; mean minibatch loss."""
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


def _procedure_settings(procedure: str, **overrides) -> dict:
    """The named procedure's settings with every explicitly passed (non-None) value on top."""
    if not isinstance(procedure, str) or procedure not in PROCEDURES:
        raise ValueError(f"procedure must be one of {sorted(PROCEDURES)}, got {procedure!r}")
    settings = dict(PROCEDURES[procedure])
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings


def _merge_optional(train_values, calib_values, train_name, calib_name, n_train, n_calib):
    if train_values is None and calib_values is None:
        return None
    if train_values is None or calib_values is None:
        raise ValueError(f"pass both {train_name} and {calib_name}, or neither")
    return check.check_optional_list(train_values, train_name, n_train) + check.check_optional_list(
        calib_values, calib_name, n_calib
    )
