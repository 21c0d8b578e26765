"""Validation of a stored SDM head before anything is built from it; every failure is an
:class:`~sdm_hf.head.format_errors.SDMFormatError` naming the file and the field.

Tensors are checked against the config (name, dtype, shape, finiteness, label ranges, sorted lists), and the
calibration against its own arrays: rerunning Algorithm 1 at the stored alpha must give the stored ``q'_min``
and thresholds ``psi``. Schmaltz (2025), Similarity-Distance-Magnitude Activations, arXiv:2509.12760,
Algorithm 1.
"""

from __future__ import annotations

import math

import torch

from ..maths.activation import rescaled_similarity
from ..maths.calibration import class_rescaled_lists
from ..maths.distance import class_distance_lists, distance_quantile
from .config import SDMConfig
from .format_errors import SDMFormatError
from .state import CalibrationState, SDMHeadState, SupportState, thresholds_at, weight_shapes

__all__ = ["TensorChecker", "state_from_files", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

_FINITE_CHUNK = 1 << 24  # elements checked at a time: a bounded mask, whatever the tensor's size


def _all_finite(value: torch.Tensor) -> bool:
    flat = value.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + _FINITE_CHUNK]).all()) for i in range(0, flat.numel(), _FINITE_CHUNK))


class TensorChecker:
    """Validates stored tensors against what the config says, raising ``SDMFormatError`` naming ``path``.

    Args:
        tensors: name -> tensor as read from the file; :meth:`finish` refuses any not asked for.
    """

    def __init__(self, path, tensors: dict[str, torch.Tensor]):
        self.path = path
        self.tensors = tensors
        self.used: set[str] = set()

    def fail(self, problem: str):
        """Raise ``SDMFormatError(path, problem)``."""
        raise SDMFormatError(self.path, problem)

    def get(self, name: str, dtype: torch.dtype, shape: tuple, finite: bool = True, copy: bool = True) -> torch.Tensor:
        """The tensor ``name``, checked for ``dtype``, ``shape`` (None: any size) and, if ``finite``, NaN/inf.

        Args:
            copy: return a copy, so the file's memory map is not kept alive; False only for a tensor
                released while loading (the support vectors).
        """
        if name not in self.tensors:
            self.fail(f"missing tensor {name!r}")
        value = self.tensors[name]
        self.used.add(name)
        if value.dtype != dtype:
            self.fail(f"tensor {name!r} has dtype {value.dtype}, expected {dtype}")
        if len(shape) != value.dim() or any(want is not None and want != got for want, got in zip(shape, value.shape)):
            self.fail(f"tensor {name!r} has shape {tuple(value.shape)}, expected {shape} (None = any)")
        if finite and value.is_floating_point() and not _all_finite(value):
            self.fail(f"tensor {name!r} contains NaN or infinite values")
        return value.clone() if copy else value

    def labels(self, name: str, length: int | None, num_classes: int, lowest: int = 0) -> torch.Tensor:
        """The ``(length,)`` int64 tensor ``name``, values in ``lowest..num_classes-1``."""
        value = self.get(name, torch.int64, (length,))
        if value.numel() and (int(value.min()) < lowest or int(value.max()) >= num_classes):
            self.fail(f"tensor {name!r} has values outside {lowest}..{num_classes - 1}")
        return value

    def lists(self, name: str, dtype, num_classes: int, total: int | None = None) -> list[torch.Tensor]:
        """``num_classes`` sorted lists from ``name`` and its ``*_list_offsets`` tensor (``total`` values)."""
        values = self.get(name, dtype, (total,))
        offsets = self.get(name.replace("_lists", "_list_offsets"), torch.int64, (num_classes + 1,))
        if int(offsets[0]) != 0 or int(offsets[-1]) != values.numel() or bool((offsets[1:] < offsets[:-1]).any()):
            self.fail(f"tensor {name!r}: offsets do not partition the {values.numel()} values")
        out = [values[int(a) : int(b)] for a, b in zip(offsets[:-1], offsets[1:])]
        if any(t.numel() > 1 and bool((t[1:] < t[:-1]).any()) for t in out):
            self.fail(f"tensor {name!r}: a class's list is not sorted")
        return out

    def finish(self) -> None:
        """Raise for any stored tensor that no check asked for."""
        unexpected = sorted(set(self.tensors) - self.used)
        if unexpected:
            self.fail(f"unexpected tensor(s) {unexpected}")


def state_from_files(
    config: dict, tensors: dict, documents: list[dict] | None, paths: dict | None = None
) -> SDMHeadState:
    """Validate what ``read_files`` returned (config, tensors, documents or None) as an :class:`SDMHeadState`.

    Args:
        paths: file name -> where it came from, for error messages (default: the bare names).

    Raises:
        SDMFormatError: any field or tensor that is missing, malformed or inconsistent.
    """
    paths = paths or {}
    config_path = paths.get(CONFIG_NAME, CONFIG_NAME)
    weights_path = paths.get(WEIGHTS_NAME, WEIGHTS_NAME)
    try:
        sdm_config = SDMConfig.from_dict(dict(config["config"]))
    except (TypeError, ValueError) as err:
        raise SDMFormatError(config_path, f"invalid SDMConfig ({err})") from None
    c, d_in, m = sdm_config.num_classes, sdm_config.input_dim, sdm_config.exemplar_dim
    check = TensorChecker(weights_path, tensors)
    weights = {name: check.get(name, torch.float32, shape) for name, shape in weight_shapes(sdm_config).items()}
    if bool((weights["feature_std"] <= 0).any()):
        check.fail("tensor 'feature_std' must be > 0")

    support = None
    support_info = config["support"]
    if support_info is not None:
        if not isinstance(support_info, dict) or not isinstance(support_info.get("size"), int):
            raise SDMFormatError(config_path, "'support' must be an object with an integer 'size'")
        n = support_info["size"]
        storage = torch.float16 if sdm_config.support_storage == "float16" else torch.float32
        support = SupportState(
            # not copied: the index (FAISS, or the device copy) takes the values and this view is released
            vectors=check.get("support.vectors", storage, (n, m), copy=False),
            labels=check.labels("support.labels", n, c, lowest=-1),  # -1: a known out-of-distribution row
            predictions=check.labels("support.predictions", n, c),
        )
        _check_support_predictions(support, weights, check)
        if documents is not None:
            support.ids = [doc.get("id") for doc in documents] if support_info.get("has_ids") else None
            support.texts = [doc.get("text") for doc in documents] if support_info.get("has_texts") else None

    calibration = None
    cal_info = config["calibration"]
    if cal_info is not None:
        if support_info is None:
            raise SDMFormatError(config_path, "a calibration is stored without a support set")
        calibration = _calibration_from_files(cal_info, check, config_path, c, d_in, sdm_config.min_class_points)
    check.finish()
    selection = dict(config["selection"]) if config.get("selection") is not None else None
    return SDMHeadState(sdm_config, weights, support, calibration, selection)


_PREDICTION_BYTES = 1 << 26  # float64 working set of the prediction check: 64 MiB at any support size


def _check_support_predictions(support: SupportState, weights: dict[str, torch.Tensor], check: TensorChecker) -> None:
    """Fail unless the stored predictions are ``argmax(W e + b)`` on the stored exemplars, up to rounding."""
    w, b = weights["classifier.weight"].double(), weights["classifier.bias"].double()
    rows = max(1, _PREDICTION_BYTES // (8 * max(1, w.shape[1])))
    for start in range(0, support.size, rows):  # chunks of rows, each vectorised
        logits = support.vectors[start : start + rows].double() @ w.T + b
        chosen = logits.gather(1, support.predictions[start : start + rows].view(-1, 1)).squeeze(1)
        best = logits.max(dim=1).values
        # tolerance: float16 exemplars are rounded (relative error ~5e-4)
        if bool((best - chosen > 1e-2 * (1.0 + best.abs())).any()):
            check.fail("tensor 'support.predictions' is not the classifier's argmax on 'support.vectors'")


def _calibration_from_files(
    cal_info: dict, check: TensorChecker, config_path, c: int, d_in: int, min_class_points: int | str = 0
) -> CalibrationState:
    """The checked calibration of ``cal_info`` (config entry) and its tensors."""
    try:
        alpha = float(cal_info["alpha"])
        q_min = math.inf if cal_info["q_min"] is None else float(cal_info["q_min"])
        thresholds = torch.tensor([float(v) for v in cal_info["thresholds"]], dtype=torch.float64)
        n = int(cal_info["size"])
    except (KeyError, TypeError, ValueError) as err:
        raise SDMFormatError(config_path, f"invalid 'calibration' entry ({err})") from None
    if thresholds.numel() != c or not bool(torch.isfinite(thresholds).all()) or math.isnan(q_min):
        raise SDMFormatError(config_path, f"'thresholds' must be {c} finite numbers and 'q_min' a number or null")
    if not q_min >= 0.0:
        raise SDMFormatError(config_path, f"'q_min' must be >= 0 or null (empty region), got {q_min}")
    if bool(((thresholds < 0.0) | (thresholds > 1.0)).any()):
        raise SDMFormatError(
            config_path, f"'thresholds' are probabilities and must lie in [0, 1], got {thresholds.tolist()}"
        )
    if not 0.5 < alpha <= 1.0:
        raise SDMFormatError(config_path, f"alpha must satisfy 0.5 < alpha <= 1, got {alpha}")
    features = None
    if cal_info.get("has_features"):
        features = check.get("calibration.features", torch.float32, (n, d_in))
    cal = CalibrationState(
        labels=check.labels("calibration.labels", n, c),
        predictions=check.labels("calibration.predictions", n, c),
        probabilities=check.get("calibration.probabilities", torch.float32, (n, c)),
        q=check.get("calibration.q", torch.int64, (n,)),
        d=check.get("calibration.d", torch.float32, (n,)),
        d_nearest=check.get("calibration.d_nearest", torch.float32, (n,)),
        rescaled_similarity=check.get("calibration.rescaled_similarity", torch.float32, (n,)),
        features=features,
        alpha=alpha,
        q_min=q_min,
        thresholds=thresholds,
        distance_lists=check.lists("calibration.distance_lists", torch.float32, c),
        rescaled_lists=check.lists("calibration.rescaled_lists", torch.float64, c, total=n),
        stale=bool(cal_info.get("stale", False)),
        min_class_points=min_class_points,
    )
    if bool((cal.q < 0).any()):
        check.fail("tensor 'calibration.q' has negative values")
    _check_calibration_consistency(cal, check, config_path)
    return cal


def _check_calibration_consistency(cal: CalibrationState, check: TensorChecker, config_path) -> None:
    """Fail unless what the calibration arrays determine (argmax, ``q'``, class-wise lists, Algorithm 1's
    ``q'_min`` and ``psi``) equals what is stored; O(N log N)."""
    c = len(cal.distance_lists)
    predicted = cal.probabilities.gather(1, cal.predictions.view(-1, 1)).squeeze(1)
    if bool((predicted < cal.probabilities.max(dim=1).values).any()):
        check.fail("tensor 'calibration.predictions' is not the argmax of 'calibration.probabilities'")
    if not torch.equal(rescaled_similarity(cal.q, predicted), cal.rescaled_similarity):
        check.fail("tensor 'calibration.rescaled_similarity' does not follow from 'calibration.q' and probabilities")
    lists = class_distance_lists(cal.d_nearest, cal.labels, cal.q, c)
    if any(not torch.equal(a, b) for a, b in zip(lists, cal.distance_lists)):
        check.fail("tensor 'calibration.distance_lists' does not follow from the stored nearest distances")
    if not torch.equal(distance_quantile(cal.d_nearest, cal.distance_lists), cal.d):
        check.fail("tensor 'calibration.d' does not follow from the stored distance lists")
    rescaled_lists = class_rescaled_lists(cal.rescaled_similarity, cal.labels, c)
    if any(not torch.equal(a, b) for a, b in zip(rescaled_lists, cal.rescaled_lists)):
        check.fail("tensor 'calibration.rescaled_lists' does not follow from 'calibration.rescaled_similarity'")
    q_min, thresholds = thresholds_at(cal, cal.alpha)
    same_q_min = q_min == cal.q_min or (math.isinf(q_min) and math.isinf(cal.q_min))
    if not same_q_min or not torch.equal(thresholds, cal.thresholds):
        raise SDMFormatError(
            config_path,
            f"'q_min' / 'thresholds' ({cal.q_min}, {cal.thresholds.tolist()}) are not what Algorithm 1 gives on "
            f"the stored calibration arrays at alpha={cal.alpha} ({q_min}, {thresholds.tolist()}): the config and "
            "the tensors do not belong to the same head; save it again",
        )
