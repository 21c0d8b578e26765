"""``SDMHead``: the SDM estimator over frozen features, as an ``nn.Module`` with Hub persistence.

Schmaltz (2025), Similarity-Distance-Magnitude Activations, arXiv:2509.12760:
``sdm(z')_i = (2 + q)^{d z'_i} / sum_j (2 + q)^{d z'_j}`` from Similarity ``q``, Distance ``d`` and the
logits ``z'``, with the high-reliability (HR) region of Algorithm 1 (derivation: docs/how_sdm_works.md).

Shapes: ``B`` query rows, ``N`` support rows, ``D`` input width, ``M`` exemplar width, ``C`` classes.
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

    :meth:`save_pretrained`, :meth:`from_pretrained` (folder or Hub repo, optional ``subfolder``) and
    :meth:`push_to_hub` store JSON + safetensors only; :meth:`to_state` / :meth:`from_state` use plain tensors.

    Args:
        config: the :class:`SDMConfig`.
        generator: optional ``torch.Generator`` for reproducible initial weights.

    Attributes:
        support: the :class:`~sdm_hf.head.support.SupportSet` (None before ``build_support``).
        calibration: the :class:`~sdm_hf.head.state.CalibrationState` (None before ``calibrate``).
        training_history: per-epoch metric dicts of :func:`~sdm_hf.fit_sdm_head` (empty otherwise).
        selection: the :class:`~sdm_hf.head.fit_selection.FitSelection` of the fit (kept state, rows), or None.
    """

    def __init__(self, config: SDMConfig, generator: torch.Generator | None = None):
        super().__init__(config, generator)
        self.support: SupportSet | None = None
        self.calibration: CalibrationState | None = None
        self.training_history: list[dict] = []
        self.selection: FitSelection | None = None

    def _adopt(self, previous: SDMConfig) -> None:
        # a new alpha or guard in ``head.config = ...``: the region follows at once
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
        """Make ``(x, y)`` the support set (exemplars, predictions, index); drops any calibration.

        Args:
            x: ``(N, D)`` float training features; y: ``(N,)`` int labels ``0..C-1``.
            ids, texts: optional per-row document ids / texts (length N, for explanations).
            batch_size: rows encoded at a time.

        Raises:
            ValueError / TypeError: bad shapes or labels, or a class with fewer than 2 rows.
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
        """Append points ``x (K, D)`` with labels ``y (K,)`` to the support set, without retraining.

        ``ood=True`` (no ``y``) adds known out-of-distribution points (label -1): a query whose nearest
        exemplar is one of them gets ``q = 0``. The calibration is marked stale; ``recalibrate(recompute=True)``
        recomputes it against the grown support.

        Raises:
            ValueError: no support set yet; ``y`` with ``ood=True`` or missing without it; ``ids`` / ``texts``
                given exactly when the support stores none (or missing when it does).
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
        """Exemplars, CPU logits, CPU predictions and similarity of ``x`` (``self_index``: own rows, -1 none)."""
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
        """Calibrate on held-out labelled points: distance eCDFs, ``q'`` arrays and Algorithm 1.

        Args:
            x: ``(N, D)`` float calibration features (not in the support set); y: ``(N,)`` int labels.
            alpha: target accuracy in ``(0.5, 1]`` (default ``config.alpha``; stored in the config).
            store_features: keep ``x`` for ``recalibrate(recompute=True)``.
            batch_size: rows encoded at a time.

        Returns:
            ``self``. An empty HR region (the head admits nothing) issues a UserWarning saying why.

        Raises:
            ValueError: no support set; a bad ``alpha``, shape or label, or a class with fewer than 2 rows.
        """
        return self._calibrate(x, y, alpha, store_features, batch_size, stacklevel=4)

    def _calibrate(self, x, y, alpha, store_features: bool, batch_size: int, stacklevel: int) -> SDMHead:
        # shared by calibrate() and recalibrate(recompute=True); the warning points at the user's call
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
        """Adopt ``calibration`` (and its alpha); warn, ``stacklevel`` frames up, when its region is empty."""
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
        """Rerun calibration at another alpha or after the support set grew; returns ``self``.

        Args:
            alpha: new target accuracy (default: the current one).
            recompute: False reruns only Algorithm 1 on the stored arrays; True first recomputes the
                calibration points' ``q``, ``d`` and ``q'`` against the current support.
            x, y: ``(N, D)`` / ``(N,)`` calibration data for ``recompute=True`` (default: the stored ones).
            min_class_points: replaces the small-region guard when given (0: off; ``"auto"``; an integer).

        Raises:
            ValueError: no calibration yet; a bad ``alpha`` or ``min_class_points``; ``x`` / ``y`` without
                ``recompute=True``; ``recompute=True`` without ``x`` when no features were stored.
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
        """Whether :meth:`calibrate` has run."""
        return self.calibration is not None

    @property
    def calibration_is_stale(self) -> bool:
        """True after :meth:`add_to_support` until the next recompute."""
        return self.calibration is not None and self.calibration.stale

    @property
    def alpha(self) -> float:
        """The calibrated alpha (``config.alpha`` before calibration)."""
        return self.calibration.alpha if self.calibration is not None else self.config.alpha

    @property
    def q_min(self) -> float:
        """Algorithm 1's ``q'_min`` (``inf``: empty HR region); ValueError before calibration."""
        return self._require_calibration().q_min

    @property
    def thresholds(self) -> torch.Tensor:
        """``(C,)`` float64 class-wise thresholds ``psi`` (a copy); ValueError before calibration."""
        return self._require_calibration().thresholds.clone()

    @property
    def calibration_arrays(self) -> dict[str, torch.Tensor]:
        """Copies of the per-point calibration arrays (``labels``, ``q``, ``d``, ...), keyed by name."""
        return self._require_calibration().arrays()

    # -- inference ------------------------------------------------------------------------
    def compute_training_distance_lists(self) -> list[torch.Tensor]:
        """(Re)compute and return the C class-wise distance lists of the support points, own row excluded
        (their ``d`` in ``predict(..., support_rows=...)``)."""
        return self._require_support().training_distance_lists(self.config, recompute=True)

    def predict(
        self, x: FeaturesLike, batch_size: int = 8192, k_neighbors: int = 1, support_rows: torch.Tensor | None = None
    ) -> SDMOutput:
        """SDM inference: prediction, ``sdm(z')``, ``q``, ``d``, ``q'``, OOD, HR (and lower bound), nearest exemplar.

        Args:
            x: ``(B, D)`` float raw features (support points among them need ``support_rows``).
            batch_size: rows encoded at a time.
            k_neighbors: when > 1, also return the ``k`` nearest support rows and distances.
            support_rows: ``(B,)`` int, for points that are support points: each row's own support row
                (-1: none), excluded from its search; those rows' ``d`` uses the support's own lists.

        Returns:
            :class:`SDMOutput` with CPU tensors.

        Raises:
            ValueError: not calibrated; a bad shape, ``k_neighbors`` or ``support_rows`` shape.
        """
        return self._predict(x, batch_size, k_neighbors, support_rows, self._require_support())

    def _predict(
        self, x: FeaturesLike, batch_size: int, k_neighbors: int, support_rows: torch.Tensor | None, support: SupportSet
    ) -> SDMOutput:
        # predict() against a given support set (index_agreement compares two)
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
        """Possible label errors among ``x (B, D)``, ``y (B,)`` (points not in the support set).

        Returns:
            :class:`LabelErrors`: admitted points whose label differs from the prediction, sorted by
            ``(sdm(z')_{y_hat}, q')`` descending.
        """
        x = check.as_features(x, "x", self.config.input_dim)
        y = check.as_labels(y, "y", self.config.num_classes, length=x.shape[0])
        return label_errors(self.predict(x, batch_size=batch_size), y)

    def index_agreement(self, x: FeaturesLike, batch_size: int = 8192) -> dict:
        """How often this head's (approximate or float16) index answers as an exact float32 search, on ``x (B, D)``.

        Returns:
            dict: ``n``, ``index_type``, ``storage`` and the shares of equal ``q``, ``d``, nearest row, HR and
            HR-lower (``same_q``, ``same_d``, ``same_nearest``, ``same_hr``, ``same_hr_lower``).
        """
        self._require_calibration()
        support = self._require_support()
        approximate = self._predict(x, batch_size, 1, None, support)
        reference = self._predict(x, batch_size, 1, None, support.exact_copy())
        agreement = output_agreement(approximate, reference)
        return {"n": agreement.pop("n"), "index_type": support.index_type, "storage": support.storage, **agreement}

    def calibration_report(self, alphas: Iterable[float] = (0.8, 0.9, 0.95)) -> CalibrationReport:
        """Per class: calibration points, OOD count, HR admission and accuracy at the chosen alpha and ``alphas``.

        In-sample figures (the thresholds were fitted on these points); ``report.diagnosis`` names the
        class that limits the region and what to try. ValueError on a bad alpha or before calibration.
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
        """The head as plain CPU tensors, which :meth:`from_state` rebuilds (not ``training_history``).

        Args:
            copy: True returns an independent snapshot; False shares storage with the live head (valid
                only until the head changes: write or send it at once).

        Raises:
            ValueError / TypeError: the config no longer validates.
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
        """A head rebuilt from ``state`` on ``device`` (default CPU), sharing its calibration tensors.

        Raises:
            TypeError: ``state`` is not an SDMHeadState.
        """
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
        """The head's model card; ``model_card_kwargs`` (``license``, ``tags``, ...) as in
        :func:`sdm_hf.head.model_card.render_model_card` (no license unless given)."""
        tags = self._hub_mixin_info.model_card_data.tags or HUB_TAGS  # huggingface_hub adds its own tag
        data = head_card_data(self, repo_hint, subfolder, tags)
        return render_model_card(data, **model_card_kwargs)
