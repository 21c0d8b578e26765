"""``SDMHead``: the SDM estimator over frozen features, as an ``nn.Module`` with Hub persistence.

The module (Schmaltz 2025, *Similarity-Distance-Magnitude Activations*, arXiv:2509.12760):
feature normalisation ``(x - mean) / std``, an affine *adaptor* ``R^D -> R^M`` whose output is
the exemplar vector used for neighbour search, and a linear classifier ``R^M -> R^C`` giving
the logits ``z'``. After :meth:`SDMHead.build_support` (the training exemplars behind a FAISS
index) and :meth:`SDMHead.calibrate` (held-out points, Algorithm 1) it predicts with
Similarity ``q``, Distance ``d`` and Magnitude ``z'``, and admits points to the
high-reliability (HR) region.

The class delegates: the support set to :mod:`.support`, the calibration to the pure functions
of :mod:`.state`, output assembly to :mod:`.inference`, reports to :mod:`.diagnostics`, the
card to :mod:`.model_card` and files to :mod:`.hub`.

Shapes: ``B`` query rows, ``N`` support rows, ``D`` input width, ``M`` exemplar width,
``C`` classes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from copy import deepcopy
from dataclasses import replace
from typing import Any

import torch
from huggingface_hub import ModelCard

from ..maths.distance import distance_quantile
from ..maths.similarity import SimilarityResult
from ..search.index import SupportIndex, resolve_device
from ..utils import validation as check
from ..utils.validation import FeaturesLike, LabelsLike
from . import state as calibration_steps
from .config import SDMConfig, changes_region
from .diagnostics import CalibrationReport, LabelErrors, calibration_report, label_errors, output_agreement
from .fit_selection import FitSelection
from .hub import SDMHubMixin
from .inference import SDMOutput, assemble_output, with_alpha_levels
from .model_card import HUB_TAGS, head_card_data, render_model_card
from .module import SDMModule
from .state import CalibrationState, SDMHeadState
from .support import SupportSet, new_support_labels

__all__ = ["SDMHead"]


class SDMHead(
    SDMModule, SDMHubMixin, library_name="sdm_hf", tags=list(HUB_TAGS), paper_url="https://arxiv.org/abs/2509.12760"
):
    """The SDM estimator: adaptor + classifier + support set + calibration.

    Build it with :func:`sdm_hf.fit_sdm_head`, or step by step::

        >>> import torch
        >>> from sdm_hf import SDMConfig, SDMHead
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(40, 8, generator=g); y = (x[:, 0] > 0).long()
        >>> head = SDMHead(SDMConfig(input_dim=8, exemplar_dim=16, alpha=0.9))
        >>> head.set_normalization(x.mean(), x.std())
        >>> head.build_support(x[:20], y[:20])
        >>> _ = head.calibrate(x[20:], y[20:])  # may warn that the HR region is empty
        >>> out = head.predict(x[:3])
        >>> out.probabilities.shape
        torch.Size([3, 2])

    Persistence (huggingface_hub's ``ModelHubMixin``): :meth:`save_pretrained`,
    :meth:`from_pretrained` (local folder or Hub repo, optional ``subfolder``) and
    :meth:`push_to_hub` store strict JSON + safetensors only (see ``sdm_hf.head.serialization``);
    :meth:`to_state` / :meth:`from_state` give the same content as plain tensors.

    Attributes:
        config: the :class:`SDMConfig`.
        support: the :class:`~sdm_hf.head.support.SupportSet` (None before ``build_support``).
        calibration: the :class:`~sdm_hf.head.state.CalibrationState` (None before ``calibrate``).
        training_history: per-epoch metrics of :func:`~sdm_hf.fit_sdm_head` (empty otherwise).
        selection: which shuffle and epoch :func:`~sdm_hf.fit_sdm_head` kept (``shuffle``,
            ``epoch``, ``calibration_loss``, and in memory ``support_rows`` /
            ``calibration_rows``: the rows of the pooled data each split came from), or None.

    Args:
        config: the :class:`SDMConfig`.
        generator: optional ``torch.Generator`` for the initial weights (reproducible init).
    """

    def __init__(self, config: SDMConfig, generator: torch.Generator | None = None):
        super().__init__(config, generator)
        self.support: SupportSet | None = None
        self.calibration: CalibrationState | None = None
        self.training_history: list[dict] = []
        self.selection: FitSelection | None = None

    def _adopt(self, previous: SDMConfig) -> None:
        # ``head.config = replace(...)`` with another alpha or guard: the region follows at once
        if self.calibration is not None and changes_region(previous, self.config):
            self.recalibrate(alpha=self.config.alpha)

    def _apply(self, fn, recurse=True):
        # nn.Module.to/.cuda/.cpu all end here: keep the support index beside the weights.
        result = super()._apply(fn, recurse)
        if self.support is not None and self.support.device != self.device:
            self.support.to(self.device)
        return result

    # -- support set ----------------------------------------------------------------------
    @property
    def support(self) -> SupportSet | None:
        """The support set (None before :meth:`build_support`)."""
        return self._support

    @support.setter
    def support(self, value: SupportSet | SupportIndex | None) -> None:
        # a bare SupportIndex (e.g. an exact reference index built by hand) is wrapped
        if isinstance(value, SupportIndex):
            value = SupportSet(value)
        if value is not None and not isinstance(value, SupportSet):
            raise TypeError(f"support must be a SupportSet or SupportIndex, got {type(value).__name__}")
        self._support = value

    @property
    def support_ids(self) -> list | None:
        """Per-row ids of the support set, or None."""
        return None if self.support is None else self.support.ids

    @support_ids.setter
    def support_ids(self, ids: list | None) -> None:
        if ids is not None or self.support is not None:
            support = self._require_support()
            support.ids = check.check_optional_list(ids, "support_ids", support.ntotal)

    @property
    def support_texts(self) -> list | None:
        """Per-row texts of the support set, or None."""
        return None if self.support is None else self.support.texts

    @support_texts.setter
    def support_texts(self, texts: list | None) -> None:
        if texts is not None or self.support is not None:
            support = self._require_support()
            support.texts = check.check_optional_list(texts, "support_texts", support.ntotal)

    def build_support(
        self, x: FeaturesLike, y: LabelsLike, ids: list | None = None, texts: list | None = None, batch_size: int = 8192
    ) -> None:
        """Make ``(x, y)`` the support set: exemplars, predictions and the index.

        Any previous calibration is dropped (it referred to another support set).

        Args:
            x: ``[N, D]`` training features.
            y: ``[N]`` true labels.
            ids, texts: optional per-row document ids / texts (for explanations).
            batch_size: rows encoded at a time.
        """
        x = check.as_features(x, "x", self.config.input_dim)
        y = check.as_labels(y, "y", self.config.num_classes, length=x.shape[0])
        check.check_class_counts(y, "the support set (y)", self.config.num_classes)
        ids = check.check_optional_list(ids, "ids", x.shape[0])
        texts = check.check_optional_list(texts, "texts", x.shape[0])
        exemplars, logits = self.encode_for_inference(x, batch_size)
        self.support = SupportSet.build(exemplars, y, logits.argmax(dim=1), self.config, self.device, ids, texts)
        self.calibration = None

    def add_to_support(  # fmt: skip
        self,
        x: FeaturesLike,
        y: LabelsLike | None = None,
        ids: list | None = None,
        texts: list | None = None,
        ood: bool = False,
    ) -> None:
        """Append labelled points to the support set without retraining (updatability: the
        estimator grows with new labelled data, no gradient step needed). ``ood=True`` (``y``
        None) adds known out-of-distribution points (label -1): a query whose nearest
        exemplar is one of them gets ``q = 0``, i.e. is flagged OOD.

        The calibration stays as it was (and is marked stale); call
        ``recalibrate(recompute=True)`` to recompute the calibration ``q`` against the grown
        support.
        """
        support = self._require_support()
        x = check.as_features(x, "x", self.config.input_dim)
        y = new_support_labels(y, x.shape[0], self.config.num_classes, ood)
        ids = check.check_optional_list(ids, "ids", x.shape[0])
        texts = check.check_optional_list(texts, "texts", x.shape[0])
        exemplars, logits = self.encode_for_inference(x, 8192)
        support.add(exemplars, y, logits.argmax(dim=1), ids, texts)
        if self.calibration is not None:
            self.calibration.stale = True

    def _require_support(self) -> SupportSet:
        if self.support is None:
            raise ValueError(
                "the head has no support set yet; call build_support(train_x, train_y) (or use fit_sdm_head) first"
            )
        return self.support

    def _require_calibration(self) -> CalibrationState:
        self._require_support()
        if self.calibration is None:
            raise ValueError(
                "the head is not calibrated; call calibrate(calib_x, calib_y) (or use fit_sdm_head) before predicting"
            )
        return self.calibration

    @torch.no_grad()
    def _neighbourhood(
        self,
        x: torch.Tensor,
        batch_size: int,
        self_index: torch.Tensor | None = None,
        support: SupportSet | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, SimilarityResult]:
        """exemplars, CPU logits, CPU predictions and the similarity of raw features ``x``
        (``self_index``: each row's own support row, -1 for none, excluded from its search)."""
        support = support if support is not None else self._require_support()
        exemplars, logits = self.encode_for_inference(x, batch_size)
        prediction = logits.argmax(dim=1)
        sim = support.similarity(exemplars, prediction, self.config, self_index=self_index)
        return exemplars, logits.float().cpu(), prediction.cpu(), sim

    # -- calibration ----------------------------------------------------------------------
    def calibrate(
        self,
        x: FeaturesLike,
        y: LabelsLike,
        alpha: float | None = None,
        store_features: bool = True,
        batch_size: int = 8192,
    ) -> SDMHead:
        """Calibrate on held-out labelled points: eCDFs, ``q'`` arrays and Algorithm 1.

        Args:
            x: ``[N, D]`` calibration features (not in the support set).
            y: ``[N]`` true labels.
            alpha: target accuracy (defaults to ``config.alpha``; stored in the config).
            store_features: keep ``x`` so that ``recalibrate(recompute=True)`` can run
                without being given the features again.
            batch_size: rows encoded at a time.

        Returns:
            ``self`` (so calls chain). When Algorithm 1 finds no threshold a warning says why;
            the head then admits nothing.
        """
        return self._calibrate(x, y, alpha, store_features, batch_size, stacklevel=4)

    def _calibrate(self, x, y, alpha, store_features: bool, batch_size: int, stacklevel: int) -> SDMHead:
        # calibrate() for it and for recalibrate(recompute=True): the empty-region warning
        # points ``stacklevel`` frames up, at the user's call of either
        self._require_support()
        alpha = check.check_alpha(self.config.alpha if alpha is None else alpha)
        x = check.as_features(x, "x", self.config.input_dim)
        y = check.as_labels(y, "y", self.config.num_classes, length=x.shape[0])
        check.check_class_counts(y, "the calibration set (y)", self.config.num_classes)
        _, logits, _, sim = self._neighbourhood(x, batch_size)
        features = x.cpu() if store_features else None
        self._set_calibration(
            calibration_steps.calibrate(
                y, logits, sim.q, sim.d_nearest, self.config.num_classes, alpha, features, self.config.min_class_points
            ),
            stacklevel=stacklevel,
        )
        return self

    def _set_calibration(self, calibration: CalibrationState, stacklevel: int = 3) -> None:
        """Adopt ``calibration`` (its alpha becomes the config's) and warn when its HR region
        is empty, saying why; the warning points ``stacklevel`` frames up (the user's call)."""
        self.calibration = calibration
        self.config._update(alpha=calibration.alpha)
        if calibration.is_empty_region:
            reason = calibration.explain_empty(self.config.num_classes, self.config.id2label)
            empty = f"The high-reliability region is empty at alpha={calibration.alpha}: every point will be rejected"
            warnings.warn(f"{empty}. Why: {reason}", UserWarning, stacklevel=stacklevel)

    def recalibrate(
        self,
        alpha: float | None = None,
        recompute: bool = False,
        x: FeaturesLike | None = None,
        y: LabelsLike | None = None,
        min_class_points: int | str | None = None,
    ) -> SDMHead:
        """Rerun calibration, e.g. at another alpha or after the support set grew; returns ``self``.

        ``recompute=False``: only Algorithm 1 on the stored calibration arrays at the new
        ``alpha`` (milliseconds). ``recompute=True``: recompute the calibration points' ``q``,
        ``d`` and ``q'`` against the current support (after :meth:`add_to_support`), from the
        stored calibration features or ``x`` / ``y``, then Algorithm 1. ``min_class_points``
        (when given) first replaces the small-region guard (0: off; ``"auto"``; an integer).

        Raises:
            ValueError: a bad ``alpha`` or ``min_class_points``; no calibration yet.
        """
        cal = self._require_calibration()
        alpha = check.check_alpha(cal.alpha if alpha is None else alpha)
        if not recompute and (x is not None or y is not None):
            raise ValueError("x / y are only used with recompute=True")
        if min_class_points is not None:
            self.config._update(min_class_points=min_class_points)
        if not recompute:
            self._set_calibration(calibration_steps.with_alpha(cal, alpha, self.config.min_class_points))
            return self
        if x is None:
            if cal.features is None:
                raise ValueError(
                    "this head did not store its calibration features (store_features=False); "
                    "pass them: recalibrate(recompute=True, x=calib_x, y=calib_y)"
                )
            x = cal.features
        y = cal.labels if y is None else y
        keep = cal.features is not None or x is not None
        return self._calibrate(x, y, alpha, keep, 8192, stacklevel=4)

    @property
    def is_calibrated(self) -> bool:
        return self.calibration is not None

    @property
    def calibration_is_stale(self) -> bool:
        """True after :meth:`add_to_support` until the next recompute."""
        return self.calibration is not None and self.calibration.stale

    @property
    def alpha(self) -> float:
        return self.calibration.alpha if self.calibration is not None else self.config.alpha

    @property
    def q_min(self) -> float:
        """Algorithm 1's ``q'_min`` (``inf`` when the HR region is empty)."""
        return self._require_calibration().q_min

    @property
    def thresholds(self) -> torch.Tensor:
        """``[C]`` class-wise thresholds ``psi`` (float64)."""
        return self._require_calibration().thresholds.clone()

    @property
    def calibration_arrays(self) -> dict[str, torch.Tensor]:
        """The stored per-point calibration arrays (copies), keyed by name."""
        return self._require_calibration().arrays()

    # -- inference ------------------------------------------------------------------------
    def compute_training_distance_lists(self) -> list[torch.Tensor]:
        """Class-wise distance lists of the support set itself, each point's own row excluded:
        a support point's ``d`` during training is read from these, not from the calibration
        set's lists. Cached for ``predict(..., support_rows=...)`` and returned."""
        return self._require_support().training_distance_lists(self.config, recompute=True)

    def predict(
        self, x: FeaturesLike, batch_size: int = 8192, k_neighbors: int = 1, support_rows: torch.Tensor | None = None
    ) -> SDMOutput:
        """SDM inference for a batch: prediction, ``sdm(z')``, ``q``, ``d``, ``q'``, OOD, HR and
        its lower-bound variant, and the nearest exemplar.

        Args:
            x: ``[B, D]`` raw features of new points (not support points).
            batch_size: rows encoded at a time.
            k_neighbors: also return the ``k`` nearest support rows and distances (for
                explanations) when > 1.
            support_rows: ``[B]`` for points that ARE support points (training time): each
                row's own support row (-1 for others). It is excluded from that row's search
                by identity, and those rows' ``d`` is read from the support set's own distance
                lists (:meth:`compute_training_distance_lists`), as during the head's training.

        Returns:
            :class:`SDMOutput` with CPU tensors.
        """
        return self._predict(x, batch_size, k_neighbors, support_rows, self._require_support())

    def _predict(
        self, x: FeaturesLike, batch_size: int, k_neighbors: int, support_rows: torch.Tensor | None, support: SupportSet
    ) -> SDMOutput:
        # predict() against a given support set (index_agreement compares two of them)
        cal = self._require_calibration()
        x = check.as_features(x, "x", self.config.input_dim)
        k_neighbors = check.check_positive_int(k_neighbors, "k_neighbors")
        own = None
        if support_rows is not None:
            own = torch.as_tensor(support_rows).long().cpu()
            if own.shape != (x.shape[0],):
                raise ValueError(f"support_rows must have shape [{x.shape[0]}], got {tuple(own.shape)}")
        exemplars, logits, prediction, sim = self._neighbourhood(x, batch_size, own, support)
        d = distance_quantile(sim.d_nearest, cal.distance_lists)
        if own is not None and bool((own >= 0).any()):
            in_support = own >= 0
            lists = support.training_distance_lists(self.config)
            d[in_support] = distance_quantile(sim.d_nearest[in_support], lists)
        neighbor_indices = neighbor_distances = None
        if k_neighbors > 1 and x.shape[0] > 0:
            neighbor_distances, neighbor_indices = support.search(exemplars, min(k_neighbors, support.ntotal))
        ids = support.ids_of(sim.nearest_index)
        out = assemble_output(logits, prediction, sim, d, cal, ids, neighbor_indices, neighbor_distances)
        return with_alpha_levels(out, cal, self.config.alphas)

    def predict_records(self, x: FeaturesLike, **kwargs: Any) -> list[dict]:
        """:meth:`predict`, as one JSON-ready dict per row with label names."""
        return self.predict(x, **kwargs).to_list(self.config.id2label)

    # -- diagnostics ----------------------------------------------------------------------
    def label_errors(self, x: FeaturesLike, y: LabelsLike, batch_size: int = 8192) -> LabelErrors:
        """Possible label errors among ``(x, y)``.

        Returns the admitted (HR) points whose given label differs from the prediction,
        sorted by ``(sdm(z')_{y_hat}, q')`` descending: the head is most sure that these
        labels are wrong. Use it on points that are NOT in the support set.
        """
        x = check.as_features(x, "x", self.config.input_dim)
        y = check.as_labels(y, "y", self.config.num_classes, length=x.shape[0])
        return label_errors(self.predict(x, batch_size=batch_size), y)

    def index_agreement(self, x: FeaturesLike, batch_size: int = 8192) -> dict:
        """How often this head's support index (approximate, or float16) gives the same
        answers as an exact float32 search over the same exemplars, on points ``x``.

        Returns:
            dict with the fractions of points whose ``q``, ``d``, nearest exemplar, HR and
            HR-lower decisions are equal (``same_q``, ``same_d``, ``same_nearest``,
            ``same_hr``, ``same_hr_lower``), ``n``, ``index_type`` and ``storage``.
        """
        self._require_calibration()
        support = self._require_support()
        approximate = self._predict(x, batch_size, 1, None, support)
        reference = self._predict(x, batch_size, 1, None, support.exact_copy())
        agreement = output_agreement(approximate, reference)
        return {"n": agreement.pop("n"), "index_type": support.index_type, "storage": support.storage, **agreement}

    def calibration_report(self, alphas: Iterable[float] = (0.8, 0.9, 0.95)) -> CalibrationReport:
        """Per class: calibration points, OOD count, HR admission and accuracy, at the chosen
        alpha and at ``alphas`` (Algorithm 1 is rerun on the stored arrays for each).

        The calibration set is the one the thresholds were fitted on, so these are
        in-sample figures: they show the trade-off, not a test estimate. ``report.diagnosis``
        (printed with the table) names the class that limits the region, estimates what more
        calibration data would admit and says what to try.
        """
        alphas = [check.check_alpha(a) for a in alphas]
        return calibration_report(self._require_calibration(), alphas, self.config.id2label, self.selection)

    def extra_repr(self) -> str:
        support = "none" if self.support is None else f"{self.support.ntotal} rows ({self.support.backend})"
        if self.calibration is None:
            calibration = "not calibrated"
        else:
            calibration = f"alpha={self.calibration.alpha}, q_min={self.calibration.q_min:.4g}"
        return f"support={support}, {calibration}"

    # -- state and persistence ------------------------------------------------------------
    def to_state(self, copy: bool = True) -> SDMHeadState:
        """The head as plain CPU tensors: what is saved, and what rebuilds it with
        :meth:`from_state` (``training_history`` and cached search results are not part of it).

        Args:
            copy: True (default) returns an independent snapshot. False shares storage with
                the live head where it can (weights, calibration arrays, and on the CPU the
                support vectors as a view into the FAISS index: no copy of what can be
                gigabytes); such a state is valid only until the head changes, so write or
                send it at once (this is what saving does).

        Raises:
            ValueError / TypeError: the config no longer validates (see ``check_saveable``).
        """
        self.config.check_saveable()
        weights = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        support = None if self.support is None else self.support.to_state()
        state = SDMHeadState(
            config=self.config,
            weights=weights,
            support=support,
            calibration=None if self.calibration is None else replace(self.calibration),
            selection=None if self.selection is None else dict(self.selection),
        )
        return deepcopy(state) if copy else state

    @classmethod
    def from_state(cls, state: SDMHeadState, device: str | torch.device | None = None) -> SDMHead:
        """A head rebuilt from ``state`` (the FAISS index from the stored exemplars) on ``device``
        (CPU by default). The head takes over the state's calibration tensors (they are never
        changed in place); pass ``to_state()`` (a copy) to keep the source head independent."""
        if not isinstance(state, SDMHeadState):
            raise TypeError(f"state must be an SDMHeadState, got {type(state).__name__}")
        device = resolve_device(device)
        head = cls(deepcopy(state.config))
        head.load_state_dict(state.weights, strict=True)
        head.to(device)
        if state.support is not None:
            head.support = SupportSet.from_state(state.support, head.config, device)
        head.calibration = None if state.calibration is None else replace(state.calibration)
        head.selection = None if state.selection is None else FitSelection(state.selection)
        return head

    def generate_model_card(
        self, repo_hint: str | None = None, subfolder: str | None = None, **model_card_kwargs: Any
    ) -> ModelCard:
        """The head's model card (Hub YAML metadata with the calibration results + summary + the
        promise); ``model_card_kwargs`` (``license``, ``tags``, ...) as in
        :func:`sdm_hf.head.model_card.render_model_card`. No license unless one is given."""
        tags = self._hub_mixin_info.model_card_data.tags or HUB_TAGS  # huggingface_hub adds its own tag
        data = head_card_data(self, repo_hint, subfolder, tags)
        return render_model_card(data, **model_card_kwargs)
