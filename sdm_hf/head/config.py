"""``SDMConfig``: every setting needed to rebuild an (untrained) SDM head.

Each field carries ``help`` metadata and is validated on construction and on assignment;
:meth:`SDMConfig.to_dict` / :meth:`SDMConfig.from_dict` are the head's ``config.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import NamedTuple

from ..features.layout import check_feature_blocks
from ..maths.calibration import minimum_class_points
from ..search.index import index_parameters
from ..utils import validation as check
from ..utils.counting import label_names

__all__ = ["SDMConfig", "NORMALIZATIONS", "FeatureRecipe"]


class FeatureRecipe(NamedTuple):
    """How a head's input features were made from one model (:attr:`SDMConfig.feature_recipe`)."""

    model: str | None
    revision: str | None
    pooling: str | None
    layer: int | None
    max_length: int | None


NORMALIZATIONS = ("scalar", "feature")

# Fields a fitted head's weights, support index or calibration depend on: assigning one on
# ``head.config`` is refused with what to do instead.
WEIGHT_FIELDS = ("input_dim", "num_classes", "exemplar_dim", "normalization")
SUPPORT_FIELDS = ("max_q", "initial_k", "index_type", "index_params", "support_storage")
CALIBRATION_FIELDS = ("alpha", "min_class_points")
HEAD_FIXED_FIELDS = WEIGHT_FIELDS + SUPPORT_FIELDS + CALIBRATION_FIELDS


def is_verification_pooling(feature_pooling: str | None) -> bool:
    """Whether ``feature_pooling`` is ``"verification"`` or ``"verification-<pooling>"`` (an LM verification head)."""
    return feature_pooling is not None and str(feature_pooling).split("-", 1)[0] == "verification"


def changes_region(old: SDMConfig, new: SDMConfig) -> bool:
    """Whether replacing ``old`` by ``new`` changes the HR region (alpha or the guard)."""
    return any(getattr(old, name) != getattr(new, name) for name in CALIBRATION_FIELDS)


def fixed_field_message(name: str) -> str:
    """Why ``name`` cannot be assigned on a head's config, and what to do instead."""
    if name in CALIBRATION_FIELDS:
        return (
            f"{name} of a fitted head's config sets its HR region: call head.recalibrate({name}=...) "
            "(milliseconds), which reruns Algorithm 1 and updates the config"
        )
    if name in WEIGHT_FIELDS:
        return f"{name} is fixed by the head's weights; build a new head (fit_sdm_head or SDMHead(config))"
    return f"{name} is fixed when the head's support set is built; build a new head with the setting you want"


@dataclass
class SDMConfig:
    """Configuration of an SDM head; the config alone rebuilds the (untrained) module.

    Raises:
        ValueError, TypeError: a field (at construction or assignment) that does not validate.

    Example:
        >>> cfg = SDMConfig(input_dim=32, num_classes=2, id2label={0: "false", 1: "true"})
        >>> SDMConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    input_dim: int = field(metadata={"help": "Width D of the input features."})
    num_classes: int = field(default=2, metadata={"help": "Number of classes C (>= 2)."})
    exemplar_dim: int = field(default=1000, metadata={"help": "Width M of the exemplar vectors (adaptor output)."})
    alpha: float = field(default=0.95, metadata={"help": "Target accuracy of the HR region, 0.5 < alpha <= 1."})
    alphas: list[float] | None = field(
        default=None,
        metadata={
            "help": "Further target accuracies (risk tiers, e.g. [0.9, 0.99]) whose HR regions predict() also "
            "reports (SDMOutput.in_hr_at, highest_hr_alpha); the head's own region stays that of alpha."
        },
    )
    min_class_points: int | str = field(
        default=0,
        metadata={
            "help": "Small-region guard of the calibration (0: off, Algorithm 1 as published): a candidate "
            "q'_min also needs at least this many calibration points of every class at or above it; 'auto' = "
            "ceil(1 / (1 - alpha)) (20 at alpha 0.95). It either leaves the HR region unchanged or empties it."
        },
    )
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
    base_model_path: str | None = field(
        default=None,
        metadata={"help": "The local copy the features were computed from, when base_model is its Hub id."},
    )
    feature_pooling: str | None = field(
        default=None, metadata={"help": "How features were pooled: 'mean', 'last', 'cls', 'mean_last', ..."}
    )
    feature_layer: int | None = field(default=None, metadata={"help": "Hidden-state layer the features come from."})
    feature_max_length: int | None = field(
        default=None, metadata={"help": "Tokenizer max_length used for the features."}
    )
    feature_blocks: list[dict] | None = field(
        default=None,
        metadata={
            "help": "Composed features (several models' features concatenated): one dict per block, in column "
            "order, {'model', 'revision', 'pooling', 'layer', 'max_length', 'dim', 'start', 'stop'}, as "
            "sdm_hf.extract_composed_features returns them; the blocks must cover 0..input_dim."
        },
    )

    def __setattr__(self, name, value):
        # once built, every assignment is validated like a constructor argument; a head's config
        # also refuses its HEAD_FIXED_FIELDS
        if not self.__dict__.get("_validated") or name.startswith("_"):
            object.__setattr__(self, name, value)
            return
        if name in self.__dict__.get("_fixed", ()):
            raise ValueError(fixed_field_message(name))
        if name not in {f.name for f in fields(self)}:
            raise AttributeError(f"SDMConfig has no field {name!r}; fields: {sorted(f.name for f in fields(self))}")
        checked = replace(self, **{name: value})  # runs __post_init__: raises ValueError / TypeError
        object.__setattr__(self, name, getattr(checked, name))

    def _update(self, **values) -> None:
        """Set fields after validating them together, fixed fields included (head-internal)."""
        checked = replace(self, **values)
        for name in values:
            object.__setattr__(self, name, getattr(checked, name))

    def __post_init__(self):
        object.__setattr__(self, "_validated", False)
        self.input_dim = check.check_positive_int(self.input_dim, "input_dim")
        self.num_classes = check.check_positive_int(self.num_classes, "num_classes", minimum=2)
        self.exemplar_dim = check.check_positive_int(self.exemplar_dim, "exemplar_dim")
        self.max_q = check.check_positive_int(self.max_q, "max_q")
        self.initial_k = check.check_positive_int(self.initial_k, "initial_k")
        self.alpha = check.check_alpha(self.alpha)
        minimum_class_points(self.min_class_points, self.alpha)  # raises on a bad value
        if self.alphas is not None:
            if isinstance(self.alphas, (str, bytes)) or not hasattr(self.alphas, "__iter__"):
                raise TypeError(f"alphas must be a list of floats in (0.5, 1], got {self.alphas!r}")
            try:
                self.alphas = sorted({check.check_alpha(a) for a in self.alphas}) or None
            except (TypeError, ValueError) as err:
                raise type(err)(f"alphas: every tier {str(err).removeprefix('alpha ')}") from None
        if self.support_storage not in ("float32", "float16"):
            raise ValueError(f"support_storage must be 'float32' or 'float16', got {self.support_storage!r}")
        if self.index_params is not None and not isinstance(self.index_params, dict):
            raise TypeError(f"index_params must be a dict or None, got {type(self.index_params).__name__}")
        try:
            index_parameters(self.index_type, self.index_params, ntotal=1)  # raises on a bad type or key
        except (TypeError, ValueError) as err:
            raise type(err)(f"index_type / index_params: {err}") from None
        if self.index_params is not None:
            self.index_params = dict(self.index_params)
        for name in ("base_model", "base_model_revision", "base_model_path", "feature_pooling"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a string or None, got {type(value).__name__}")
        if self.feature_layer is not None:
            if isinstance(self.feature_layer, bool) or not isinstance(self.feature_layer, int):
                raise TypeError(f"feature_layer must be an integer or None, got {type(self.feature_layer).__name__}")
        if self.feature_max_length is not None:
            self.feature_max_length = check.check_positive_int(self.feature_max_length, "feature_max_length")
        if self.feature_blocks is not None:
            if isinstance(self.feature_blocks, (str, bytes, dict)) or not isinstance(self.feature_blocks, list):
                raise TypeError(
                    f"feature_blocks must be a list of dicts or None, got {type(self.feature_blocks).__name__}"
                )
            try:
                self.feature_blocks = check_feature_blocks(self.feature_blocks, input_dim=self.input_dim)
            except (TypeError, ValueError) as err:
                raise type(err)(f"feature_blocks: {err}") from None
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.id2label is not None:
            if not isinstance(self.id2label, dict):
                raise TypeError(
                    f"id2label must be a dict {{class index: name}} or None, got {type(self.id2label).__name__}"
                )
            try:
                self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            except (TypeError, ValueError):
                raise ValueError(
                    f"id2label keys must be class indices 0..C-1, got {sorted(map(str, self.id2label))}"
                ) from None
            missing = sorted(set(range(self.num_classes)) - set(self.id2label))
            if missing or len(self.id2label) != self.num_classes:
                raise ValueError(
                    f"id2label must name exactly the classes 0..{self.num_classes - 1}; "
                    f"got keys {sorted(self.id2label)}"
                )
        object.__setattr__(self, "_validated", True)

    def check_saveable(self) -> None:
        """Raise ValueError / TypeError when a field changed in place (``config.alphas.append(0.3)``) no longer
        validates, so that nothing unreadable is saved."""
        try:
            SDMConfig.from_dict(self.to_dict())
        except (TypeError, ValueError) as err:
            raise type(err)(f"the head's config no longer validates ({err}); fix the field before saving") from None

    @property
    def feature_recipe(self) -> FeatureRecipe | None:
        """The one model, revision, pooling, layer and max length of the features (from the
        ``base_model`` / ``feature_*`` fields or a single ``feature_blocks`` entry); None when composed of several."""
        blocks = self.feature_blocks
        if blocks is not None and len(blocks) > 1:
            return None
        if blocks:
            block = blocks[0]
            return FeatureRecipe(*(block.get(k) for k in ("model", "revision", "pooling", "layer", "max_length")))
        return FeatureRecipe(
            self.base_model, self.base_model_revision, self.feature_pooling, self.feature_layer, self.feature_max_length
        )

    @property
    def label2id(self) -> dict[str, int] | None:
        return None if self.id2label is None else {v: k for k, v in self.id2label.items()}

    def label_name(self, index: int) -> str:
        """Display name of class ``index`` (its number when no ``id2label`` is set); ValueError outside 0..C-1."""
        index = int(index)
        if not 0 <= index < self.num_classes:
            raise ValueError(f"class index must be in 0..{self.num_classes - 1}, got {index}")
        return label_names(self.num_classes, self.id2label)[index]

    def to_dict(self) -> dict:
        """JSON-ready dict (``id2label`` keys become strings, as in transformers configs)."""
        out = asdict(self)
        if self.alphas is None:  # written only when set: heads without them stay readable everywhere
            out.pop("alphas")
        if self.feature_blocks is None:  # likewise: only composed heads need a reader that knows the field
            out.pop("feature_blocks")
        if self.min_class_points == 0:  # likewise: only guarded heads need a reader that knows the field
            out.pop("min_class_points")
        if self.base_model_path is None:  # likewise
            out.pop("base_model_path")
        if self.id2label is not None:
            out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        return out

    @classmethod
    def from_dict(cls, values: dict) -> SDMConfig:
        """The config of a :meth:`to_dict` dict; ValueError on an unknown field."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown SDMConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)
