"""``SDMConfig``, ``SDMHead`` and ``SDMOutput``: the SDM estimator over frozen features.

An :class:`SDMHead` is an ``nn.Module`` (SPEC A1): scalar feature normalisation, an affine
*adaptor* ``R^D -> R^M`` whose output is the exemplar vector used for neighbour search,
and a linear classifier ``R^M -> R^C``. After :meth:`SDMHead.build_support` and
:meth:`SDMHead.calibrate` it predicts with Similarity, Distance and Magnitude and admits
points to the high-reliability (HR) region (SPEC A2-A5, A7, A8).

Shapes: ``B`` query rows, ``N`` support rows, ``D`` input width, ``M`` exemplar width,
``C`` classes.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, ModelHubMixin, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError
from torch import nn

from . import _validation as check
from . import persistence
from .activation import (
    high_reliability_mask,
    rescaled_similarity,
    sdm_activation,
)
from .calibration import (
    class_rescaled_lists,
    effective_sample_sizes,
    explain_empty_region,
    high_reliability_thresholds,
    lower_bound_margin,
)
from .distance import class_distance_lists, distance_quantile
from .index import SupportIndex, index_parameters, resolve_device
from .similarity import compute_similarity

__all__ = ["SDMConfig", "SDMHead", "SDMOutput", "CalibrationReport", "LabelErrors"]

_NORMALIZATIONS = ("scalar", "feature")


@dataclass
class SDMConfig:
    """Configuration of an SDM head; the config alone rebuilds the (untrained) module.

    Example:
        >>> cfg = SDMConfig(input_dim=32, num_classes=2, id2label={0: "false", 1: "true"})
        >>> SDMConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    input_dim: int = field(metadata={"help": "Width D of the input features."})
    num_classes: int = field(default=2, metadata={"help": "Number of classes C (>= 2)."})
    exemplar_dim: int = field(default=1000, metadata={"help": "Width M of the exemplar vectors (adaptor output)."})
    alpha: float = field(default=0.95, metadata={"help": "Target accuracy of the HR region, 0.5 < alpha <= 1."})
    max_q: int = field(default=2048, metadata={"help": "Cap on the similarity q."})
    id2label: dict[int, str] | None = field(default=None, metadata={"help": "Class index -> display name."})
    normalization: str = field(
        default="scalar",
        metadata={"help": "'scalar' (one mean/std over all elements, the papers') or 'feature'."},
    )
    initial_k: int = field(default=32, metadata={"help": "First neighbour-search width; widened adaptively."})
    index_type: str = field(
        default="flat", metadata={"help": "Support index: 'flat' (exact), 'ivf' or 'hnsw' (approximate, FAISS)."}
    )
    index_params: dict | None = field(
        default=None,
        metadata={"help": "ivf: nlist, nprobe; hnsw: M, efConstruction, efSearch (defaults filled in)."},
    )
    support_storage: str = field(
        default="float32", metadata={"help": "Exemplar storage: 'float32' or 'float16' (half the memory)."}
    )
    base_model: str | None = field(
        default=None, metadata={"help": "Name or path of the model whose features the head reads."}
    )
    base_model_revision: str | None = field(default=None, metadata={"help": "Revision of base_model."})
    feature_pooling: str | None = field(
        default=None, metadata={"help": "How features were pooled: 'mean', 'last', 'cls', 'mean_last', ..."}
    )
    feature_layer: int | None = field(default=None, metadata={"help": "Hidden-state layer the features come from."})
    feature_max_length: int | None = field(
        default=None, metadata={"help": "Tokenizer max_length used for the features."}
    )

    def __post_init__(self):
        self.input_dim = check.check_positive_int(self.input_dim, "input_dim")
        self.num_classes = check.check_positive_int(self.num_classes, "num_classes", minimum=2)
        self.exemplar_dim = check.check_positive_int(self.exemplar_dim, "exemplar_dim")
        self.max_q = check.check_positive_int(self.max_q, "max_q")
        self.initial_k = check.check_positive_int(self.initial_k, "initial_k")
        self.alpha = check.check_alpha(self.alpha)
        if self.support_storage not in ("float32", "float16"):
            raise ValueError(f"support_storage must be 'float32' or 'float16', got {self.support_storage!r}")
        index_parameters(self.index_type, self.index_params, ntotal=1)  # raises on a bad type or key
        if self.index_params is not None:
            self.index_params = dict(self.index_params)
        if self.normalization not in _NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {self.normalization!r}")
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            missing = sorted(set(range(self.num_classes)) - set(self.id2label))
            if missing or len(self.id2label) != self.num_classes:
                raise ValueError(
                    f"id2label must name exactly the classes 0..{self.num_classes - 1}; "
                    f"got keys {sorted(self.id2label)}"
                )

    @property
    def label2id(self) -> dict[str, int] | None:
        return None if self.id2label is None else {v: k for k, v in self.id2label.items()}

    def label_name(self, index: int) -> str:
        """Display name of class ``index`` (its number when no ``id2label`` is set)."""
        return self.id2label[int(index)] if self.id2label else str(int(index))

    def to_dict(self) -> dict:
        """JSON-ready dict (``id2label`` keys become strings, as in transformers configs)."""
        out = asdict(self)
        if self.id2label is not None:
            out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        return out

    @classmethod
    def from_dict(cls, values: dict) -> SDMConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown SDMConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)


@dataclass
class SDMOutput:
    """Batch inference output of :meth:`SDMHead.predict` (SPEC A7). All tensors on the CPU.

    Attributes:
        logits: ``[B, C]`` ``z'``.
        prediction: ``[B]`` ``y_hat = argmax z'``.
        probabilities: ``[B, C]`` ``sdm(z')``.
        q: ``[B]`` similarity (int64).
        d: ``[B]`` distance quantile in ``[0, 1]``.
        d_nearest: ``[B]`` squared L2 distance to the nearest support exemplar.
        nearest_index: ``[B]`` support row of that exemplar.
        rescaled_similarity: ``[B]`` ``q'``.
        is_ood: ``[B]`` bool, ``q = 0``.
        in_hr: ``[B]`` bool, admitted to the HR region.
        effective_sample_size: ``[B, C]`` per-class effective sample sizes.
        d_lower, d_upper: ``[B]`` ``d -/+ eps`` clipped to ``[0, 1]``.
        probabilities_lower: ``[B, C]`` ``sdm`` recomputed with ``d_lower``.
        rescaled_similarity_lower: ``[B]`` ``q'`` from ``probabilities_lower``.
        in_hr_lower: ``[B]`` bool, admitted by the lower-bound variant.
        nearest_id: ids of the nearest exemplars when the support stores ids, else None.
        neighbor_indices, neighbor_distances: ``[B, k]`` when ``k_neighbors > 1`` was asked.
    """

    logits: torch.Tensor
    prediction: torch.Tensor
    probabilities: torch.Tensor
    q: torch.Tensor
    d: torch.Tensor
    d_nearest: torch.Tensor
    nearest_index: torch.Tensor
    rescaled_similarity: torch.Tensor
    is_ood: torch.Tensor
    in_hr: torch.Tensor
    effective_sample_size: torch.Tensor
    d_lower: torch.Tensor
    d_upper: torch.Tensor
    probabilities_lower: torch.Tensor
    rescaled_similarity_lower: torch.Tensor
    in_hr_lower: torch.Tensor
    nearest_id: list | None = None
    neighbor_indices: torch.Tensor | None = None
    neighbor_distances: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.prediction.shape[0])

    @property
    def predicted_probability(self) -> torch.Tensor:
        """``[B]`` ``sdm(z')_{y_hat}``."""
        return self.probabilities.gather(1, self.prediction.view(-1, 1)).squeeze(1)

    def to_list(self, id2label: dict[int, str] | None = None) -> list[dict]:
        """One plain (JSON-serialisable) dict per row, with label names when given."""
        name = (lambda c: id2label[int(c)]) if id2label else (lambda c: int(c))
        p = self.probabilities.tolist()
        p_lower = self.probabilities_lower.tolist()
        rows = []
        for i in range(len(self)):  # formatting output records, not a numeric hot path
            row = {
                "label": name(self.prediction[i]),
                "prediction": int(self.prediction[i]),
                "probability": float(self.predicted_probability[i]),
                "probabilities": {str(name(c)): float(v) for c, v in enumerate(p[i])},
                "high_reliability": bool(self.in_hr[i]),
                "high_reliability_lower": bool(self.in_hr_lower[i]),
                "is_ood": bool(self.is_ood[i]),
                "q": int(self.q[i]),
                "d": float(self.d[i]),
                "d_nearest": float(self.d_nearest[i]),
                "rescaled_similarity": float(self.rescaled_similarity[i]),
                "d_lower": float(self.d_lower[i]),
                "probability_lower": float(p_lower[i][int(self.prediction[i])]),
                "nearest_index": int(self.nearest_index[i]),
            }
            if self.nearest_id is not None:
                row["nearest_id"] = self.nearest_id[i]
            rows.append(row)
        return rows


@dataclass
class _Calibration:
    """Per-point calibration arrays (SPEC A6) and Algorithm 1's result."""

    labels: torch.Tensor  # [N] int64
    predictions: torch.Tensor  # [N] int64
    probabilities: torch.Tensor  # [N, C] float32 sdm(z')
    q: torch.Tensor  # [N] int64
    d: torch.Tensor  # [N] float32
    d_nearest: torch.Tensor  # [N] float32
    rescaled: torch.Tensor  # [N] float32 q'
    features: torch.Tensor | None  # [N, D] raw features (for recalibrate(recompute=True))
    alpha: float
    q_min: float
    thresholds: torch.Tensor  # [C] float64
    distance_lists: list[torch.Tensor]
    rescaled_lists: list[torch.Tensor]
    stale: bool = False

    @property
    def true_class_probability(self) -> torch.Tensor:
        return self.probabilities.gather(1, self.labels.view(-1, 1)).squeeze(1)

    @property
    def predicted_probability(self) -> torch.Tensor:
        return self.probabilities.gather(1, self.predictions.view(-1, 1)).squeeze(1)


@dataclass
class CalibrationReport:
    """Per-class summary of the HR region on the calibration set at one or more alphas.

    ``rows`` holds one dict per (alpha, class) with keys ``alpha``, ``class``, ``label``,
    ``n`` (calibration points of that true class), ``ood``, ``admitted`` (admitted points
    of that true class), ``admitted_fraction`` (of ``n``), ``accuracy`` (class-conditional
    accuracy among admitted; None when none is admitted, shown as "R"),
    ``predicted_admitted`` and ``prediction_accuracy`` (prediction-conditional), ``psi``
    and ``q_min``. ``str(report)`` is a markdown table.
    """

    rows: list[dict]
    chosen_alpha: float

    def to_dict(self) -> dict:
        def clean(v):
            return None if isinstance(v, float) and not math.isfinite(v) else v

        return {
            "chosen_alpha": self.chosen_alpha,
            "rows": [{k: clean(v) for k, v in row.items()} for row in self.rows],
        }

    def to_markdown(self) -> str:
        head = "| alpha | class | n | OOD | q'_min | psi | HR admitted | class-cond. acc. | pred-cond. acc. |"
        lines = [head, "|" + "---|" * 9]

        def acc(v):
            return "R" if v is None else f"{v:.3f}"

        for r in self.rows:
            q_min = "inf" if not math.isfinite(r["q_min"]) else f"{r['q_min']:.3f}"
            lines.append(
                f"| {r['alpha']:.2f}{' *' if r['alpha'] == self.chosen_alpha else ''} "
                f"| {r['label']} | {r['n']} | {r['ood']} | {q_min} | {r['psi']:.4f} "
                f"| {r['admitted']} ({r['admitted_fraction']:.1%}) | {acc(r['accuracy'])} "
                f"| {acc(r['prediction_accuracy'])} |"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


@dataclass
class LabelErrors:
    """Possible label errors (SPEC A7): admitted points whose given label differs from the
    prediction, most confident first (by ``sdm(z')_{y_hat}``, then ``q'``, descending).

    All fields are ``[K]`` tensors; ``index`` refers to the rows of the input.
    """

    index: torch.Tensor
    label: torch.Tensor
    prediction: torch.Tensor
    probability: torch.Tensor
    rescaled_similarity: torch.Tensor

    def __len__(self) -> int:
        return int(self.index.numel())

    def to_list(self, id2label: dict[int, str] | None = None) -> list[dict]:
        name = (lambda c: id2label[int(c)]) if id2label else (lambda c: int(c))
        return [
            {
                "index": int(i),
                "label": name(y),
                "prediction": name(p),
                "probability": float(s),
                "rescaled_similarity": float(r),
            }
            for i, y, p, s, r in zip(
                self.index, self.label, self.prediction, self.probability, self.rescaled_similarity
            )
        ]


class SDMHead(
    nn.Module,
    ModelHubMixin,
    library_name="sdm_hf",
    tags=["sdm", "selective-classification", "uncertainty-quantification"],
    paper_url="https://arxiv.org/abs/2509.12760",
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
    :meth:`push_to_hub` store strict JSON + safetensors only (see ``sdm_hf.persistence``).

    Args:
        config: the :class:`SDMConfig`.
        generator: optional ``torch.Generator`` for the initial weights (reproducible init).
    """

    def __init__(self, config: SDMConfig, generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(config, SDMConfig):
            raise TypeError(f"config must be an SDMConfig, got {type(config).__name__}")
        self.config = config
        self.adaptor = nn.Linear(config.input_dim, config.exemplar_dim)
        self.classifier = nn.Linear(config.exemplar_dim, config.num_classes)
        shape = () if config.normalization == "scalar" else (config.input_dim,)
        self.register_buffer("feature_mean", torch.zeros(shape))
        self.register_buffer("feature_std", torch.ones(shape))
        self.reset_parameters(generator)
        self.support: SupportIndex | None = None
        self.support_ids: list | None = None
        self.support_texts: list | None = None
        self._calibration: _Calibration | None = None
        self._training_lists: list[torch.Tensor] | None = None
        self.training_history: list[dict] = []

    # -- parameters -----------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-initialise both linear layers like ``nn.Linear`` does (uniform with bound
        ``1/sqrt(fan_in)``), drawing from ``generator`` when given."""
        for layer in (self.adaptor, self.classifier):
            bound = 1.0 / math.sqrt(layer.in_features)
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.uniform_(-bound, bound, generator=generator)

    @property
    def device(self) -> torch.device:
        return self.adaptor.weight.device

    def _apply(self, fn, recurse=True):
        # nn.Module.to/.cuda/.cpu all end here: keep the support index beside the weights.
        result = super()._apply(fn, recurse)
        if self.support is not None and self.support.device != self.device:
            self.support.to(self.device)
        return result

    def set_normalization(self, mean, std) -> None:
        """Set the feature normalisation ``(x - mean) / std``.

        Args:
            mean, std: scalars (``normalization="scalar"``) or ``[D]`` tensors
                (``normalization="feature"``); ``std`` must be positive.
        """
        mean = torch.as_tensor(mean, dtype=torch.float32)
        std = torch.as_tensor(std, dtype=torch.float32)
        want = tuple(self.feature_mean.shape)
        if tuple(mean.shape) != want or tuple(std.shape) != want:
            raise ValueError(
                f"mean and std must have shape {want} for normalization="
                f"{self.config.normalization!r}; got {tuple(mean.shape)} and {tuple(std.shape)}"
            )
        if not bool(torch.isfinite(mean).all() & torch.isfinite(std).all() & (std > 0).all()):
            raise ValueError("mean must be finite and std finite and > 0")
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)

    @staticmethod
    def normalization_statistics(x: torch.Tensor, normalization: str = "scalar"):
        """``(mean, std)`` of training features: one scalar pair over all elements (unbiased
        std), or per feature; zero std is replaced by 1."""
        if normalization == "scalar":
            mean, std = x.mean(), x.std()
        else:
            mean, std = x.mean(dim=0), x.std(dim=0)
        return mean, torch.where(std > 0, std, torch.ones_like(std))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` raw features -> normalised features."""
        return (x - self.feature_mean) / self.feature_std

    def encode(self, normalized: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, D]`` normalised features -> ``(exemplars [B, M], logits [B, C])``."""
        exemplars = self.adaptor(normalized)
        return exemplars, self.classifier(exemplars)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` raw features -> ``[B, C]`` logits ``z'`` (differentiable)."""
        return self.encode(self.normalize(x))[1]

    @torch.no_grad()
    def _encode_batched(self, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exemplars and logits for inference, computed in float64 and rounded to float32.

        BLAS results depend on the batch shape in the last bits; in double precision those
        differences vanish when rounding to float32, so a point gets the same exemplar (and
        an exact duplicate of a support point distance 0) whatever batch it arrives in."""
        weights = [t.double() for t in (self.adaptor.weight, self.adaptor.bias)]
        head_weights = [t.double() for t in (self.classifier.weight, self.classifier.bias)]
        mean, std = self.feature_mean.double(), self.feature_std.double()
        exemplars, logits = [], []
        for start in range(0, x.shape[0], batch_size):  # bounded working set
            normalized = (x[start : start + batch_size].to(self.device).double() - mean) / std
            e = torch.nn.functional.linear(normalized, *weights)
            exemplars.append(e.float())
            logits.append(torch.nn.functional.linear(e, *head_weights).float())
        if not exemplars:
            m, c = self.config.exemplar_dim, self.config.num_classes
            return x.new_zeros((0, m)), x.new_zeros((0, c))
        return torch.cat(exemplars), torch.cat(logits)

    # -- support set ----------------------------------------------------------------------
    def build_support(
        self,
        x,
        y,
        ids: list | None = None,
        texts: list | None = None,
        batch_size: int = 8192,
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
        exemplars, logits = self._encode_batched(x, batch_size)
        self.support = self._support_index(exemplars, y, logits.argmax(dim=1))
        self.support_ids, self.support_texts = ids, texts
        self._calibration = None
        self._training_lists = None

    def _support_index(self, vectors, labels, predictions, device=None) -> SupportIndex:
        """The support index the config asks for (type, parameters, storage)."""
        cfg = self.config
        return SupportIndex(
            vectors,
            labels,
            predictions,
            device=device or self.device,
            index_type=cfg.index_type,
            index_params=cfg.index_params,
            storage=cfg.support_storage,
        )

    def add_to_support(self, x, y, ids: list | None = None, texts: list | None = None) -> None:
        """Append labelled points to the support set without retraining (SPEC A8).

        The calibration stays as it was (and is marked stale); call
        ``recalibrate(recompute=True)`` to recompute the calibration ``q`` against the grown
        support.
        """
        self._require_support()
        x = check.as_features(x, "x", self.config.input_dim)
        y = check.as_labels(y, "y", self.config.num_classes, length=x.shape[0])
        for values, name, stored in ((ids, "ids", self.support_ids), (texts, "texts", self.support_texts)):
            if (values is None) != (stored is None):
                raise ValueError(
                    f"the support set {'stores' if stored is not None else 'has no'} {name}; "
                    f"pass {name} {'for every new point' if stored is not None else 'only if it had them'}"
                )
        ids = check.check_optional_list(ids, "ids", x.shape[0])
        texts = check.check_optional_list(texts, "texts", x.shape[0])
        exemplars, logits = self._encode_batched(x, 8192)
        self.support.add(exemplars, y, logits.argmax(dim=1))
        if ids is not None:
            self.support_ids = self.support_ids + ids
        if texts is not None:
            self.support_texts = self.support_texts + texts
        self._training_lists = None
        if self._calibration is not None:
            self._calibration.stale = True

    def _require_support(self) -> None:
        if self.support is None:
            raise ValueError(
                "the head has no support set yet; call build_support(train_x, train_y) (or use fit_sdm_head) first"
            )

    def _require_calibration(self) -> _Calibration:
        self._require_support()
        if self._calibration is None:
            raise ValueError(
                "the head is not calibrated; call calibrate(calib_x, calib_y) (or use fit_sdm_head) before predicting"
            )
        return self._calibration

    # -- the core computation -------------------------------------------------------------
    @torch.no_grad()
    def _neighbourhood(self, x: torch.Tensor, batch_size: int, self_index: torch.Tensor | None = None):
        """logits, predictions, q, nearest index and d_nearest for raw features ``x``
        (``self_index``: each row's own support row, -1 for none, excluded from its search)."""
        exemplars, logits = self._encode_batched(x, batch_size)
        prediction = logits.argmax(dim=1)
        sim = compute_similarity(
            self.support,
            exemplars,
            prediction,
            self.support.labels,
            self.support.predictions,
            self_index=self_index,
            max_q=self.config.max_q,
            initial_k=self.config.initial_k,
        )
        return exemplars, logits.float().cpu(), prediction.cpu(), sim

    # -- calibration ----------------------------------------------------------------------
    def calibrate(self, x, y, alpha: float | None = None, store_features: bool = True, batch_size: int = 8192):
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
        self._require_support()
        alpha = check.check_alpha(self.config.alpha if alpha is None else alpha)
        x = check.as_features(x, "x", self.config.input_dim)
        y = check.as_labels(y, "y", self.config.num_classes, length=x.shape[0])
        check.check_class_counts(y, "the calibration set (y)", self.config.num_classes)
        _, logits, prediction, sim = self._neighbourhood(x, batch_size)
        lists = class_distance_lists(sim.d_nearest, y, sim.q, self.config.num_classes)
        d = distance_quantile(sim.d_nearest, lists)
        probabilities = sdm_activation(logits, sim.q.float(), d)
        predicted_p = probabilities.gather(1, prediction.view(-1, 1)).squeeze(1)
        rescaled = rescaled_similarity(sim.q, predicted_p)
        self._calibration = _Calibration(
            labels=y,
            predictions=prediction,
            probabilities=probabilities,
            q=sim.q,
            d=d,
            d_nearest=sim.d_nearest,
            rescaled=rescaled,
            features=x.cpu() if store_features else None,
            alpha=alpha,
            q_min=math.inf,
            thresholds=torch.zeros(self.config.num_classes, dtype=torch.float64),
            distance_lists=lists,
            rescaled_lists=class_rescaled_lists(rescaled, y, self.config.num_classes),
        )
        self._run_algorithm_1(alpha)
        return self

    def _run_algorithm_1(self, alpha: float) -> None:
        cal = self._calibration
        cal.alpha = alpha
        self.config.alpha = alpha
        cal.q_min, cal.thresholds = high_reliability_thresholds(
            cal.true_class_probability, cal.rescaled, cal.labels, self.config.num_classes, alpha
        )
        if not math.isfinite(cal.q_min):
            reason = explain_empty_region(
                cal.true_class_probability,
                cal.rescaled,
                cal.labels,
                self.config.num_classes,
                alpha,
                self.config.id2label,
            )
            warnings.warn(
                f"The high-reliability region is empty at alpha={alpha}: every point will be rejected. Why: {reason}",
                UserWarning,
                stacklevel=3,
            )

    def recalibrate(self, alpha: float | None = None, recompute: bool = False, x=None, y=None):
        """Rerun calibration (SPEC A8).

        * ``recompute=False``: only Algorithm 1 on the stored calibration arrays at the new
          ``alpha`` (milliseconds).
        * ``recompute=True``: recompute the calibration points' ``q``, ``d`` and ``q'``
          against the current support (after :meth:`add_to_support`), using the stored
          calibration features, or ``x`` / ``y`` when given, then Algorithm 1.

        Returns:
            ``self``.
        """
        cal = self._require_calibration()
        alpha = check.check_alpha(cal.alpha if alpha is None else alpha)
        if not recompute:
            if x is not None or y is not None:
                raise ValueError("x / y are only used with recompute=True")
            self._run_algorithm_1(alpha)
            return self
        if x is None:
            if cal.features is None:
                raise ValueError(
                    "this head did not store its calibration features (store_features=False); "
                    "pass them: recalibrate(recompute=True, x=calib_x, y=calib_y)"
                )
            x = cal.features
        y = cal.labels if y is None else y
        return self.calibrate(x, y, alpha=alpha, store_features=cal.features is not None or x is not None)

    @property
    def is_calibrated(self) -> bool:
        return self._calibration is not None

    @property
    def calibration_is_stale(self) -> bool:
        """True after :meth:`add_to_support` until the next recompute."""
        return self._calibration is not None and self._calibration.stale

    @property
    def alpha(self) -> float:
        return self._calibration.alpha if self._calibration is not None else self.config.alpha

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
        cal = self._require_calibration()
        return {
            "labels": cal.labels.clone(),
            "predictions": cal.predictions.clone(),
            "probabilities": cal.probabilities.clone(),
            "q": cal.q.clone(),
            "d": cal.d.clone(),
            "d_nearest": cal.d_nearest.clone(),
            "rescaled_similarity": cal.rescaled.clone(),
        }

    # -- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def compute_training_distance_lists(self) -> list[torch.Tensor]:
        """Class-wise distance lists of the support set itself, each point's own row excluded
        (SPEC A3: support points use them during training). Stored for
        ``predict(..., support_rows=...)`` and returned."""
        self._require_support()
        rows = torch.arange(self.support.ntotal)
        sim = compute_similarity(
            self.support,
            self.support.vectors,
            self.support.predictions,
            self.support.labels,
            self.support.predictions,
            self_index=rows,
            max_q=self.config.max_q,
            initial_k=self.config.initial_k,
        )
        self._training_lists = class_distance_lists(sim.d_nearest, self.support.labels, sim.q, self.config.num_classes)
        return self._training_lists

    def predict(
        self, x, batch_size: int = 8192, k_neighbors: int = 1, support_rows: torch.Tensor | None = None
    ) -> SDMOutput:
        """SDM inference for a batch (SPEC A7).

        Args:
            x: ``[B, D]`` raw features of new points (not support points).
            batch_size: rows encoded at a time.
            k_neighbors: also return the ``k`` nearest support rows and distances (for
                explanations) when > 1.
            support_rows: ``[B]`` for points that ARE support points (training time): each
                row's own support row (-1 for others). It is excluded from that row's search
                by identity, and those rows' ``d`` uses the training-split distance lists
                (:meth:`compute_training_distance_lists`), as SPEC A2/A3 prescribe.

        Returns:
            :class:`SDMOutput` with CPU tensors.
        """
        cal = self._require_calibration()
        x = check.as_features(x, "x", self.config.input_dim)
        k_neighbors = check.check_positive_int(k_neighbors, "k_neighbors")
        own = None
        if support_rows is not None:
            own = torch.as_tensor(support_rows).long().cpu()
            if own.shape != (x.shape[0],):
                raise ValueError(f"support_rows must have shape [{x.shape[0]}], got {tuple(own.shape)}")
        exemplars, logits, prediction, sim = self._neighbourhood(x, batch_size, own)
        d = distance_quantile(sim.d_nearest, cal.distance_lists)
        if own is not None and bool((own >= 0).any()):
            lists = self._training_lists
            if lists is None:
                lists = self.compute_training_distance_lists()
            in_support = own >= 0
            d[in_support] = distance_quantile(sim.d_nearest[in_support], lists)
        q = sim.q
        probabilities = sdm_activation(logits, q.float(), d)
        predicted_p = probabilities.gather(1, prediction.view(-1, 1)).squeeze(1)
        rescaled = rescaled_similarity(q, predicted_p)
        in_hr = high_reliability_mask(predicted_p, prediction, rescaled, cal.q_min, cal.thresholds)

        ess = effective_sample_sizes(rescaled, cal.rescaled_lists)
        eps = lower_bound_margin(ess, cal.alpha)
        d_lower = (d - eps).clamp(0.0, 1.0)
        d_upper = (d + eps).clamp(0.0, 1.0)
        probabilities_lower = sdm_activation(logits, q.float(), d_lower)
        predicted_p_lower = probabilities_lower.gather(1, prediction.view(-1, 1)).squeeze(1)
        rescaled_lower = rescaled_similarity(q, predicted_p_lower)
        in_hr_lower = high_reliability_mask(predicted_p_lower, prediction, rescaled_lower, cal.q_min, cal.thresholds)
        neighbor_indices = neighbor_distances = None
        if k_neighbors > 1 and x.shape[0] > 0:
            k = min(k_neighbors, self.support.ntotal)
            neighbor_distances, neighbor_indices = self.support.search(exemplars, k)
        nearest_id = None
        if self.support_ids is not None:
            nearest_id = [self.support_ids[i] if i >= 0 else None for i in sim.nearest_index.tolist()]
        return SDMOutput(
            logits=logits,
            prediction=prediction,
            probabilities=probabilities,
            q=q,
            d=d,
            d_nearest=sim.d_nearest,
            nearest_index=sim.nearest_index,
            rescaled_similarity=rescaled,
            is_ood=q == 0,
            in_hr=in_hr,
            effective_sample_size=ess,
            d_lower=d_lower,
            d_upper=d_upper,
            probabilities_lower=probabilities_lower,
            rescaled_similarity_lower=rescaled_lower,
            in_hr_lower=in_hr_lower,
            nearest_id=nearest_id,
            neighbor_indices=neighbor_indices,
            neighbor_distances=neighbor_distances,
        )

    def predict_records(self, x, **kwargs) -> list[dict]:
        """:meth:`predict`, as one JSON-ready dict per row with label names."""
        return self.predict(x, **kwargs).to_list(self.config.id2label)

    def label_errors(self, x, y, batch_size: int = 8192) -> LabelErrors:
        """Possible label errors among ``(x, y)`` (SPEC A7).

        Returns the admitted (HR) points whose given label differs from the prediction,
        sorted by ``(sdm(z')_{y_hat}, q')`` descending: the head is most sure that these
        labels are wrong. Use it on points that are NOT in the support set.
        """
        x = check.as_features(x, "x", self.config.input_dim)
        y = check.as_labels(y, "y", self.config.num_classes, length=x.shape[0])
        out = self.predict(x, batch_size=batch_size)
        candidates = (out.in_hr & (out.prediction != y)).nonzero().squeeze(1)
        probability = out.predicted_probability[candidates]
        rescaled = out.rescaled_similarity[candidates]
        # lexicographic descending order: secondary key first, then a stable primary sort
        order = torch.sort(rescaled, descending=True, stable=True).indices
        order = order[torch.sort(probability[order], descending=True, stable=True).indices]
        rows = candidates[order]
        return LabelErrors(
            index=rows,
            label=y[rows],
            prediction=out.prediction[rows],
            probability=out.predicted_probability[rows],
            rescaled_similarity=out.rescaled_similarity[rows],
        )

    def index_agreement(self, x, batch_size: int = 8192) -> dict:
        """How often this head's support index (approximate, or float16) gives the same
        answers as an exact float32 search over the same exemplars, on points ``x``.

        Returns:
            dict with the fractions of points whose ``q``, ``d``, nearest exemplar, HR and
            HR-lower decisions are equal (``same_q``, ``same_d``, ``same_nearest``,
            ``same_hr``, ``same_hr_lower``), and ``n``.
        """
        self._require_calibration()
        approximate = self.predict(x, batch_size=batch_size)
        exact = SupportIndex(
            self.support.vectors.float(), self.support.labels, self.support.predictions, device=self.device
        )
        saved, self.support = self.support, exact
        try:
            reference = self.predict(x, batch_size=batch_size)
        finally:
            self.support = saved
        n = len(reference)

        def share(a, b):
            return float((a == b).float().mean()) if n else 1.0

        return {
            "n": n,
            "index_type": self.support.index_type,
            "storage": self.support.storage,
            "same_q": share(approximate.q, reference.q),
            "same_d": share(approximate.d, reference.d),
            "same_nearest": share(approximate.nearest_index, reference.nearest_index),
            "same_hr": share(approximate.in_hr, reference.in_hr),
            "same_hr_lower": share(approximate.in_hr_lower, reference.in_hr_lower),
        }

    # -- reporting ------------------------------------------------------------------------
    def calibration_report(self, alphas=(0.8, 0.9, 0.95)) -> CalibrationReport:
        """Per class: calibration points, OOD count, HR admission and accuracy, at the chosen
        alpha and at ``alphas`` (Algorithm 1 is rerun on the stored arrays for each).

        The calibration set is the one the thresholds were fitted on, so these are
        in-sample figures: they show the trade-off, not a test estimate.
        """
        cal = self._require_calibration()
        all_alphas = sorted({cal.alpha, *(check.check_alpha(a) for a in alphas)})
        num_classes = self.config.num_classes
        predicted_p = cal.predicted_probability
        rows = []
        for alpha in all_alphas:  # a handful of alphas, each vectorised over points
            if alpha == cal.alpha:
                q_min, psi = cal.q_min, cal.thresholds
            else:
                q_min, psi = high_reliability_thresholds(
                    cal.true_class_probability, cal.rescaled, cal.labels, num_classes, alpha
                )
            admitted = high_reliability_mask(predicted_p, cal.predictions, cal.rescaled, q_min, psi)
            correct = cal.predictions == cal.labels
            for c in range(num_classes):
                true_c = cal.labels == c
                pred_c = cal.predictions == c
                n_adm = int((admitted & true_c).sum())
                n_pred_adm = int((admitted & pred_c).sum())
                n = int(true_c.sum())
                rows.append(
                    {
                        "alpha": alpha,
                        "class": c,
                        "label": self.config.label_name(c),
                        "n": n,
                        "ood": int((true_c & (cal.q == 0)).sum()),
                        "admitted": n_adm,
                        "admitted_fraction": n_adm / n if n else 0.0,
                        "accuracy": float((admitted & true_c & correct).sum()) / n_adm if n_adm else None,
                        "predicted_admitted": n_pred_adm,
                        "prediction_accuracy": (
                            float((admitted & pred_c & correct).sum()) / n_pred_adm if n_pred_adm else None
                        ),
                        "psi": float(psi[c]),
                        "q_min": float(q_min),
                    }
                )
        return CalibrationReport(rows=rows, chosen_alpha=cal.alpha)

    def extra_repr(self) -> str:
        support = "none" if self.support is None else f"{self.support.ntotal} rows ({self.support.backend})"
        if self._calibration is None:
            calibration = "not calibrated"
        else:
            calibration = f"alpha={self._calibration.alpha}, q_min={self._calibration.q_min:.4g}"
        return f"support={support}, {calibration}"

    # -- persistence (SPEC C1) ------------------------------------------------------------
    def save_pretrained(self, save_directory, *, push_to_hub: bool = False, repo_id: str | None = None, **push_kwargs):
        """Save the head (config.json, model.safetensors, optional support_documents.jsonl,
        README.md model card) into ``save_directory``.

        Files are first written to a temporary folder beside the target and only then moved
        into place, so a failure never leaves a half-written head. Save a head that belongs
        to a model into the model repository's ``sdm_head/`` subfolder (see
        :func:`sdm_hf.hub.save_sdm_model`): never into the model's own root, whose
        config.json it would replace.

        Returns:
            The commit URL when ``push_to_hub=True``, else None.
        """
        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.staging."))
        try:
            self._save_pretrained(staging)
            target.mkdir(exist_ok=True)
            names = [n for n in (persistence.WEIGHTS_NAME, persistence.DOCUMENTS_NAME, persistence.CARD_NAME)]
            for name in names + [persistence.CONFIG_NAME]:  # config.json last
                if (staging / name).exists():
                    (staging / name).replace(target / name)
                elif name == persistence.DOCUMENTS_NAME:
                    (target / name).unlink(missing_ok=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if push_to_hub:
            return self.push_to_hub(repo_id or target.name, **push_kwargs)
        return None

    def _save_pretrained(self, save_directory: Path) -> None:
        # the Hub mixin's hook: write every file of the head into save_directory
        config, tensors, documents = persistence.state_to_files(self)
        card = str(self.generate_model_card())
        persistence.write_files(Path(save_directory), config, tensors, documents, card)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        cache_dir=None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        device: str | torch.device | None = None,
    ) -> SDMHead:
        """Load a head from a local folder or a Hub repository (strictly: a missing or
        unexpected tensor, a newer format or any inconsistency raises
        :class:`sdm_hf.persistence.SDMFormatError` naming the file).

        Args:
            pretrained_model_name_or_path: a folder, or a Hub repo id.
            subfolder: folder inside it, e.g. ``"sdm_head"`` in an SDM-equipped model repo.
            revision, cache_dir, force_download, local_files_only, token: as in
                ``huggingface_hub.hf_hub_download``.
            device: where the head (and its rebuilt FAISS index) lives; CPU by default.
        """
        source = str(pretrained_model_name_or_path)
        where = f"{source}/{subfolder + '/' if subfolder else ''}"

        def fetch(name: str) -> Path:
            if Path(source).is_dir():
                return Path(source) / (subfolder or "") / name
            try:
                return Path(
                    hf_hub_download(
                        source,
                        name,
                        subfolder=subfolder,
                        revision=revision,
                        cache_dir=cache_dir,
                        force_download=force_download,
                        local_files_only=local_files_only,
                        token=token,
                    )
                )
            except (HfHubHTTPError, OSError, ValueError) as err:
                raise persistence.SDMFormatError(
                    where + name, f"could not be fetched ({type(err).__name__}: {err})"
                ) from err

        config, tensors, documents, paths = persistence.read_files(fetch)
        head = persistence.head_from_files(cls, config, tensors, documents, paths, resolve_device(device))
        return head.to(resolve_device(device)).eval()

    def push_to_hub(
        self,
        repo_id: str,
        *,
        subfolder: str | None = None,
        commit_message: str = "Upload SDM head",
        private: bool | None = None,
        token: str | None = None,
        branch: str | None = None,
        create_pr: bool | None = None,
    ) -> str:
        """Upload the head to ``repo_id`` (into ``subfolder`` when given) in one commit.

        The files are written to a temporary folder that is removed afterwards; nothing is
        left behind locally on failure. Missing or invalid credentials raise the
        huggingface_hub error with a hint.

        Returns:
            The commit URL.
        """
        api = HfApi(token=token)
        try:
            repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp) / "head"
                self.save_pretrained(folder)
                info = api.upload_folder(
                    repo_id=repo_id,
                    folder_path=folder,
                    path_in_repo=subfolder,
                    commit_message=commit_message,
                    revision=branch,
                    create_pr=create_pr,
                    repo_type="model",
                )
        except (LocalTokenNotFoundError, HfHubHTTPError) as err:
            raise type(err)(
                f"{err}\nHint: pushing needs a Hugging Face token with write access: run `hf auth "
                "login`, set HF_TOKEN, or pass token=...",
                **({"response": err.response} if isinstance(err, HfHubHTTPError) else {}),
            ) from err
        return str(getattr(info, "commit_url", info))

    def generate_model_card(self, repo_hint: str | None = None, subfolder: str | None = None) -> ModelCard:
        """The head's model card (Hub YAML metadata + calibration summary + the promise)."""
        cfg = self.config
        cal = self._calibration
        card_data = ModelCardData(
            library_name="sdm_hf",
            tags=sorted(set(self._hub_mixin_info.model_card_data.tags or [])),
            base_model=cfg.base_model,
        )
        support_counts = (
            torch.bincount(self.support.labels, minlength=cfg.num_classes).tolist()
            if self.support is not None
            else [0] * cfg.num_classes
        )
        cal_counts = torch.bincount(cal.labels, minlength=cfg.num_classes).tolist() if cal else [0] * cfg.num_classes
        if cal is not None:
            report = self.calibration_report(alphas=sorted({0.9, cal.alpha}))
            chosen = [r for r in report.rows if r["alpha"] == cal.alpha]
            admitted = sum(r["admitted"] for r in chosen)
            admission = f"{admitted} of {int(cal.labels.numel())} ({admitted / max(int(cal.labels.numel()), 1):.1%})"
            report_md = report.to_markdown()
            q_min = f"{cal.q_min:.4g}" if math.isfinite(cal.q_min) else "inf (empty region)"
            thresholds = ", ".join(f"{cfg.label_name(c)}: {v:.4f}" for c, v in enumerate(cal.thresholds.tolist()))
        else:
            admission, report_md, q_min, thresholds = "not calibrated", "not calibrated", "-", "-"
        template = resources.files("sdm_hf").joinpath("model_cards/sdm_head.md").read_text(encoding="utf-8")
        return ModelCard.from_template(
            card_data,
            template_str=template,
            title=f"SDM head{' for ' + cfg.base_model if cfg.base_model else ''}",
            alpha=self.alpha,
            q_min=q_min,
            thresholds=thresholds,
            empty_region=cal is not None and not math.isfinite(cal.q_min),
            support_size=0 if self.support is None else self.support.ntotal,
            calibration_size=0 if cal is None else int(cal.labels.numel()),
            admission=admission,
            report=report_md,
            classes=[
                {"index": c, "label": cfg.label_name(c), "support": support_counts[c], "calibration": cal_counts[c]}
                for c in range(cfg.num_classes)
            ],
            base_model=cfg.base_model,
            base_model_revision=cfg.base_model_revision,
            feature_pooling=cfg.feature_pooling,
            feature_layer=cfg.feature_layer,
            feature_max_length=cfg.feature_max_length,
            input_dim=cfg.input_dim,
            exemplar_dim=cfg.exemplar_dim,
            repo_hint=repo_hint or "path/or/repo-id",
            subfolder=subfolder,
        )
