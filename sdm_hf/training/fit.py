"""``fit_sdm_head``: train, select and calibrate an SDM head over frozen features.

Schmaltz (2025), Similarity-Distance-Magnitude Activations, arXiv:2509.12760: the head is trained with the
SDM loss ``-log_{2+q} sdm(z')_y``, a state is kept, and Algorithm 1 calibrates the HR region. Procedures
(:data:`PROCEDURES`; derivation: docs/how_sdm_works.md, section 'Training the head'): ``"auto"``, ``"paper"``,
``"fast"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch

from ..head.config import SDMConfig
from ..head.fit_selection import FitSelection
from ..head.modeling import SDMHead
from ..search.index import resolve_device
from ..utils import validation as check
from ..utils.validation import FeaturesLike, LabelsLike
from .head_training import balanced_sdm_loss, build_final_head, fit_progress_bar, train_fresh_head
from .labels import encode_labels
from .setting_choice import AUTO_CANDIDATES, check_candidates, choose_setting, holdout_split

__all__ = ["fit_sdm_head", "balanced_sdm_loss", "PROCEDURES", "FitSelection"]

# Named training procedures: the settings fit_sdm_head uses for every argument left at None.
PROCEDURES: dict[str, dict] = {
    # settings chosen on held-out training rows; calibration rows are Algorithm 1's only
    "auto": dict(
        epochs=100, shuffles=1, batch_size=50, learning_rate=1e-3, patience=10, selection_fraction=0.0,
        holdout_fraction=0.25, refit=True, resplit=False,
    ),
    # Schmaltz (2025): J = 10 shuffles x E = 200 epochs, the state of lowest calibration SDM loss
    "paper": dict(
        epochs=200, shuffles=10, batch_size=50, learning_rate=1e-5, patience=0, selection_fraction=0.0, resplit=True
    ),
    # the papers' selection rule at lr 1e-3 with early stopping
    "fast": dict(
        epochs=100, shuffles=2, batch_size=50, learning_rate=1e-3, patience=10, selection_fraction=0.0, resplit=True
    ),
}  # fmt: skip

_MAX_SPLIT_DRAWS = 100


def _draw_split(n_total, labels, num_classes, generator):
    """Seeded 50/50 split (odd element to calibration), redrawn until every class has >= 2 rows per side."""
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
    """``(selection_idx, calibration_idx)``: per class ``round(fraction * n_c)`` rows choose the state (both
    ``calib_idx`` when ``fraction == 0``)."""
    if fraction == 0:
        return calib_idx, calib_idx
    kept, held = holdout_split(
        labels[calib_idx], num_classes, fraction, generator, "calibration points", "add calibration data or pass "
        "selection_fraction=0",
    )  # fmt: skip
    return torch.sort(calib_idx[held]).values, calib_idx[kept]


def fit_sdm_head(
    train_x: FeaturesLike,
    train_y: LabelsLike,
    calib_x: FeaturesLike,
    calib_y: LabelsLike,
    config: SDMConfig | None = None,
    *,
    procedure: str = "auto",
    epochs: int | None = None,
    shuffles: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    resplit: bool | None = None,
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
    holdout_fraction: float | None = None,
    candidates: Sequence[dict] | None = None,
) -> SDMHead:
    """Train, select and calibrate an SDM head over frozen features.

    Args:
        train_x: ``(N_train, D)`` float training features (tensor or ndarray).
        train_y: ``(N_train,)`` labels: class indices ``0..C-1`` or names (str).
        calib_x: ``(N_calib, D)`` calibration features, drawn like the data the head will see.
        calib_y: ``(N_calib,)`` labels.
        config: the head's :class:`SDMConfig` (default: ``input_dim = D``, ``num_classes = max label + 1``).
        procedure: the named settings (:data:`PROCEDURES`) for every argument left at None. ``"auto"``:
            candidate settings are trained and chosen on ``holdout_fraction`` of the training rows, the
            choice is retrained on all of them and calibrated with ``min_class_points="auto"`` unless the
            config sets one; no calibration row takes part in any choice. ``"paper"``: J = 10 shuffles
            re-splitting train + calibration 50/50, E = 200 epochs at lr 1e-5, the state of lowest
            calibration loss. ``"fast"``: the same at lr 1e-3, J = 2, early stopping.
        epochs: E, the most epochs per run (epoch 0 is plain cross-entropy).
        shuffles: J, independent restarts (``"paper"``/``"fast"``; ``"auto"``: must be 1).
        batch_size: minibatch size.
        learning_rate: Adam learning rate (no weight decay), > 0.
        patience: a run ends after this many epochs without a lower selection loss (0: never).
        selection_fraction: ``"paper"``/``"fast"`` only, in ``[0, 1)``: per class, this share of each
            shuffle's calibration rows chooses the state and only the rest calibrate (0: the same rows).
        holdout_fraction: ``"auto"`` only, in ``(0, 1)``: share of training rows held out per class (0.25).
        candidates: ``"auto"`` only: dicts of :class:`SDMConfig` fields and ``learning_rate`` to choose
            between (default: scalar and per-feature normalisation).
        resplit: True pools train and calibration rows and re-splits them 50/50 (seeded): every shuffle for
            ``"paper"``/``"fast"`` (their default), once for ``"auto"`` (default False).
        seed: seeds splits, initialisations and minibatch orders, in ``[0, 2**63)``.
        device: ``None``/``"cpu"`` or ``"cuda"``; the returned head lives there.
        progress: one tqdm bar over the whole fit (one line per 30 s in a log).
        callback: called after every epoch with that epoch's metrics dict.
        train_ids, calib_ids, train_texts, calib_texts: optional per-row ids / texts (both or neither);
            the support rows' are stored for explanations.
        use_sdm_loss: False trains and selects with plain cross-entropy (``q = e - 2``, ``d = 1``): the
            "CE adaptor" baseline, still calibrated.
        ood_x: ``(K, D)`` known out-of-distribution points, added to the support set with label -1 before
            calibration (a query nearest to one has ``q = 0``).

    Returns:
        A calibrated :class:`SDMHead` with ``training_history`` (per-epoch metric dicts) and ``selection``
        (a :class:`FitSelection`: procedure, setting and state kept, and why).

    Raises:
        ValueError: bad shapes, labels or settings, a setting for the other procedure, too few rows of a
            class to split, or training that diverged.
        TypeError: a config that is not an :class:`SDMConfig`, non-numeric features, or a bad ``seed``.

    Example:
        >>> import torch
        >>> from sdm_hf import SDMConfig, fit_sdm_head
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(200, 4, generator=g); y = (x[:, 0] > 0).long()
        >>> head = fit_sdm_head(x[:100], y[:100], x[100:], y[100:],
        ...                     SDMConfig(input_dim=4, exemplar_dim=8, alpha=0.9),
        ...                     epochs=3, progress=False)
        >>> head.selection["procedure"], len(head.training_history) <= 2 * 3 + 3  # candidates + refit
        ('auto', True)
    """
    settings = _procedure_settings(
        procedure,
        epochs=epochs,
        shuffles=shuffles,
        batch_size=batch_size,
        learning_rate=learning_rate,
        patience=patience,
        selection_fraction=selection_fraction,
        holdout_fraction=holdout_fraction,
        resplit=resplit,
    )
    epochs = check.check_positive_int(settings["epochs"], "epochs")
    shuffles = check.check_positive_int(settings["shuffles"], "shuffles")
    batch_size = check.check_positive_int(settings["batch_size"], "batch_size")
    learning_rate = settings["learning_rate"]
    if not (isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be a positive number, got {learning_rate!r}")
    patience = settings["patience"]
    if patience != 0:
        patience = check.check_positive_int(patience, "patience (0 disables early stopping)")
    selection_fraction = settings["selection_fraction"]
    if not (isinstance(selection_fraction, (int, float)) and 0 <= selection_fraction < 1):
        raise ValueError(f"selection_fraction must be a number in [0, 1), got {selection_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**63:
        raise TypeError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    train_x = check.as_features(train_x, "train_x")
    calib_x = check.as_features(calib_x, "calib_x", train_x.shape[1])
    if config is not None and not isinstance(config, SDMConfig):
        raise TypeError(f"config must be an SDMConfig, got {type(config).__name__}")
    train_y, calib_y, names = encode_labels(train_y, calib_y, None if config is None else config.id2label)
    if names is not None and config is not None and config.id2label is None:
        if len(names) != config.num_classes:
            raise ValueError(
                f"the labels name {len(names)} classes ({list(names.values())[:5]}...) but config.num_classes="
                f"{config.num_classes}; pass SDMConfig(id2label=...) to fix the order and number of classes"
            )
        config = replace(config, id2label=names)
    if config is None and names is not None:
        config = SDMConfig(input_dim=train_x.shape[1], num_classes=max(len(names), 2), id2label=names)
    if config is None:
        config = SDMConfig(input_dim=train_x.shape[1], num_classes=_inferred_classes(train_y, train_x.shape[0]))
    if train_x.shape[1] != config.input_dim:
        raise ValueError(f"train_x has {train_x.shape[1]} features but config.input_dim={config.input_dim}")
    num_classes = config.num_classes
    train_y = check.as_labels(train_y, "train_y", num_classes, length=train_x.shape[0])
    calib_y = check.as_labels(calib_y, "calib_y", num_classes, length=calib_x.shape[0])
    check.check_class_counts(train_y, "train_y", num_classes)
    check.check_class_counts(calib_y, "calib_y", num_classes)
    ids = _merge_optional(train_ids, calib_ids, "train_ids", "calib_ids", train_x.shape[0], calib_x.shape[0])
    texts = _merge_optional(train_texts, calib_texts, "train_texts", "calib_texts", train_x.shape[0], calib_x.shape[0])
    ood = None if ood_x is None else check.as_features(ood_x, "ood_x", train_x.shape[1])
    run = _FitRun(
        config=config,
        all_x=torch.cat([train_x, calib_x]),
        all_y=torch.cat([train_y, calib_y]),
        n_train=train_x.shape[0],
        ids=ids,
        texts=texts,
        ood_x=ood,
        device=resolve_device(device),
        generator=torch.Generator().manual_seed(int(seed)),
        progress=progress,
        callback=callback,
        use_sdm_loss=use_sdm_loss,
    )
    if procedure == "auto":
        if shuffles != 1:
            raise ValueError("shuffles applies to 'paper' and 'fast'; 'auto' trains one run per candidate")
        if selection_fraction:
            raise ValueError("selection_fraction applies to 'paper' and 'fast'; 'auto' uses holdout_fraction")
        fraction = settings["holdout_fraction"]
        if not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
            raise ValueError(f"holdout_fraction must be a number in (0, 1), got {fraction!r}")
        chosen = check_candidates(AUTO_CANDIDATES if candidates is None else candidates, config)
        final = run.auto(chosen, settings, epochs, batch_size, learning_rate, patience, fraction)
    else:
        if candidates is not None or holdout_fraction is not None:
            raise ValueError("candidates and holdout_fraction apply to procedure='auto' only")
        final = run.shuffled(settings, epochs, shuffles, batch_size, learning_rate, patience, selection_fraction)
    final.selection = FitSelection(final.selection or {}, procedure=procedure, settings=settings)
    return final


def _inferred_classes(train_y: LabelsLike, n_rows: int) -> int:
    """``C = max label + 1`` (at least 2); ValueError when ``n_rows`` cannot hold every class twice."""
    y = check.as_labels(train_y, "train_y", num_classes=2**62, length=n_rows)
    largest = int(y.max()) if y.numel() else 1
    limit = max(2, n_rows // 2)
    if largest + 1 > limit:
        raise ValueError(
            f"train_y's largest label is {largest}, but labels are class indices 0..C-1 with at least 2 "
            f"training rows per class, so {n_rows} rows allow at most {limit} classes; map your labels to "
            "0..C-1 first (or pass an SDMConfig with num_classes)"
        )
    return max(largest + 1, 2)


class _FitRun:
    """The rows, device, generator and reporting of one fit_sdm_head call."""

    def __init__(self, *, config, all_x, all_y, n_train, ids, texts, ood_x, device, generator, progress, callback,
                 use_sdm_loss):  # fmt: skip
        self.config, self.all_x, self.all_y, self.n_train = config, all_x, all_y, n_train
        self.ids, self.texts, self.ood_x, self.device = ids, texts, ood_x, device
        self.generator, self.progress, self.callback = generator, progress, callback
        self.use_sdm_loss = use_sdm_loss
        self.history: list[dict] = []

    def _epoch_reporter(self, bar, tag: dict):
        def report(metrics, best):
            metrics.update(tag)
            self.history.append(metrics)
            if self.callback is not None:
                self.callback(dict(metrics))
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['calibration_loss']:.4f}", best=f"{best.loss:.4f}", refresh=False)

        return report

    def _final(self, config, state, support_idx, calib_idx) -> SDMHead:
        pick = support_idx.tolist()
        final = build_final_head(
            config,
            state,
            self.all_x[support_idx],
            self.all_y[support_idx],
            self.all_x[calib_idx],
            self.all_y[calib_idx],
            device=self.device,
            ids=None if self.ids is None else [self.ids[i] for i in pick],
            texts=None if self.texts is None else [self.texts[i] for i in pick],
            ood_x=self.ood_x,
            stacklevel=4,
        )
        final.training_history = self.history
        return final

    def _user_split(self, resplit: bool):
        if resplit:
            return _draw_split(self.all_x.shape[0], self.all_y, self.config.num_classes, self.generator)
        return torch.arange(self.n_train), torch.arange(self.n_train, self.all_x.shape[0])

    def shuffled(self, settings, epochs, shuffles, batch_size, learning_rate, patience, selection_fraction) -> SDMHead:
        """``"paper"`` / ``"fast"``: the best state over shuffles, on each shuffle's calibration rows."""
        config, num_classes = self.config, self.config.num_classes
        best = None
        bar = fit_progress_bar(shuffles * epochs, "fit_sdm_head", self.progress)
        try:
            for shuffle in range(shuffles):
                train_idx, calib_idx = self._user_split(settings["resplit"])
                select_idx, calib_idx = _split_selection(
                    calib_idx, self.all_y, num_classes, selection_fraction, self.generator
                )
                result = self._train(
                    config,
                    train_idx,
                    select_idx,
                    epochs,
                    batch_size,
                    learning_rate,
                    patience,
                    bar,
                    {"shuffle": shuffle},
                )
                bar.update(epochs - result.epochs_run)  # early stopping skipped these
                if best is None or result.loss <= best[0].loss:
                    best = (result, shuffle, train_idx, calib_idx, select_idx)
        finally:
            bar.close()
        if best is None:  # shuffles >= 1 is validated by the caller
            raise ValueError("no shuffle was trained; pass shuffles >= 1")
        result, shuffle, train_idx, calib_idx, select_idx = best
        final = self._final(config, result.state, train_idx, calib_idx)
        final.selection = FitSelection(
            shuffle=shuffle,
            epoch=result.epoch,
            calibration_loss=result.loss,
            support_rows=train_idx.clone(),
            calibration_rows=calib_idx.clone(),
            selection_rows=select_idx.clone(),
        )
        return final

    def _train(self, config, train_idx, select_idx, epochs, batch_size, learning_rate, patience, bar, tag,
               keep_last=False):  # fmt: skip
        """One run of a fresh head on ``train_idx``, its epoch chosen on ``select_idx`` (``keep_last``: the last)."""
        return train_fresh_head(
            config,
            self.all_x[train_idx],
            self.all_y[train_idx],
            self.all_x[select_idx],
            self.all_y[select_idx],
            generator=self.generator,
            device=self.device,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            patience=patience,
            use_sdm_loss=self.use_sdm_loss,
            on_epoch=self._epoch_reporter(bar, tag),
            keep_last=keep_last,
        )[1]

    def auto(self, candidates, settings, epochs, batch_size, learning_rate, patience, fraction) -> SDMHead:
        """``"auto"``: candidates trained and chosen on held-out training rows, then refit and calibrated."""
        train_idx, calib_idx = self._user_split(settings["resplit"])
        fit_pos, held_pos = holdout_split(self.all_y[train_idx], self.config.num_classes, fraction, self.generator)
        fit_idx, held_idx = train_idx[fit_pos], train_idx[held_pos]
        bar = fit_progress_bar(len(candidates) * epochs, "fit_sdm_head (auto)", self.progress)
        try:
            choice = choose_setting(
                self.config,
                candidates,
                self.all_x[fit_idx],
                self.all_y[fit_idx],
                self.all_x[held_idx],
                self.all_y[held_idx],
                epochs=epochs,
                batch_size=batch_size,
                learning_rate=learning_rate,
                patience=patience,
                generator=self.generator,
                device=self.device,
                use_sdm_loss=self.use_sdm_loss,
                on_epoch=self._epoch_reporter(bar, {}),
                on_run_end=lambda run: bar.update(epochs - run),
            )
            config = choice.config(self.config)
            if config.min_class_points == 0:  # the small-region guard, unless the config sets its own
                config = replace(config, min_class_points="auto")
            state = choice.chosen.run.state
            if settings.get("refit"):
                rate = choice.chosen.settings.get("learning_rate", learning_rate)
                # the chosen setting retrained on every training row for the chosen number of epochs
                bar.total += choice.chosen.run.epoch + 1
                tag = {"shuffle": len(candidates), "refit": True}
                state = self._train(
                    config, train_idx, held_idx, choice.chosen.run.epoch + 1, batch_size, rate, 0, bar, tag, True
                ).state
        finally:
            bar.close()
        final = self._final(config, state, train_idx, calib_idx)
        final.selection = FitSelection(
            shuffle=choice.candidates.index(choice.chosen),
            epoch=choice.chosen.run.epoch,
            calibration_loss=choice.chosen.run.loss,
            support_rows=train_idx.clone(),
            calibration_rows=calib_idx.clone(),
            selection_rows=held_idx.clone(),
            chosen=dict(choice.chosen.settings),
            reason=choice.reason,
            candidates=[
                {
                    "settings": dict(c.settings),
                    "loss": c.run.loss,
                    "epoch": c.run.epoch,
                    "epochs_run": c.run.epochs_run,
                    "admitted_share": c.estimate.admitted_share,
                    "class_accuracy": c.estimate.class_accuracy,
                    "holds": c.estimate.holds,
                }
                for c in choice.candidates
            ],
        )
        return final


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
