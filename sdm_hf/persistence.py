"""Safe on-disk format of an SDM head: strict JSON + safetensors, nothing else.

This module converts an :class:`~sdm_hf.head.state.SDMHeadState` to and from files; it knows
the state types only (never the head class), so saving, loading and sending a head between
processes all go through the same plain data.

A head directory holds:

* ``config.json`` — strict JSON (no ``NaN``/``Infinity`` tokens; ``q'_min = inf`` is stored
  as ``null``): the format version, the :class:`~sdm_hf.SDMConfig`, Algorithm 1's result
  (alpha, ``q'_min``, ``psi``) and a few flags.
* ``model.safetensors`` — the weights and EVERY array: support exemplars with true and
  predicted labels, the per-point calibration arrays, the class-wise distance lists and
  ``q'`` lists (flattened, with per-class offsets).
* ``support_documents.jsonl`` — optional: one ``{"id": ..., "text": ...}`` per support row.
* ``README.md`` — the model card.

Loading never deserialises Python objects and never calls ``torch.load``; the FAISS index is rebuilt from the
stored exemplars. Every problem (missing file, newer format, wrong dtype, mismatched
lengths, non-finite values, unsorted lists, unexpected or missing tensors) raises
:class:`SDMFormatError` naming the file and the problem.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .activation import rescaled_similarity
from .calibration import class_rescaled_lists, high_reliability_thresholds
from .distance import class_distance_lists, distance_quantile
from .head.config import SDMConfig
from .head.state import CalibrationState, SDMHeadState, SupportState, weight_shapes

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DOCUMENTS_NAME = "support_documents.jsonl"
CARD_NAME = "README.md"
FORMAT_KEY = "sdm_hf_format_version"

__all__ = [
    "SDMFormatError",
    "FORMAT_VERSION",
    "state_to_files",
    "state_from_files",
    "read_files",
    "write_files",
    "SELECTION_KEYS",
]

SELECTION_KEYS = ("shuffle", "epoch", "calibration_loss")  # what config.json keeps of head.selection


class SDMFormatError(ValueError):
    """A stored SDM head is missing, corrupted, inconsistent or from a newer format."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


# -- writing ------------------------------------------------------------------------------
def _flatten(lists: list[torch.Tensor], dtype) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.cat([t.to(dtype) for t in lists]) if lists else torch.zeros(0, dtype=dtype)
    offsets = torch.tensor([0] + [t.numel() for t in lists], dtype=torch.long).cumsum(0)
    return values.contiguous(), offsets


def state_to_files(state: SDMHeadState | Any) -> tuple[dict, dict[str, torch.Tensor], list[dict] | None]:
    """``(config_json, tensors, documents)`` describing ``state`` completely.

    Args:
        state: an :class:`SDMHeadState`, or a head (anything with ``to_state(copy=...)``), whose
            state is then taken without copies.

    Tensors are not copied (the support vectors can be gigabytes): write them at once."""
    if not isinstance(state, SDMHeadState) and hasattr(state, "to_state"):
        state = state.to_state(copy=False)
    if not isinstance(state, SDMHeadState):
        raise TypeError(f"state must be an SDMHeadState or a head, got {type(state).__name__}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.weights.items()}
    config: dict = {
        FORMAT_KEY: FORMAT_VERSION,
        "library": "sdm_hf",
        "config": state.config.to_dict(),
        "support": None,
        "calibration": None,
        "selection": None,
    }
    if state.selection:
        config["selection"] = {k: state.selection[k] for k in SELECTION_KEYS if k in state.selection}
    documents = None
    support = state.support
    if support is not None:
        tensors["support.vectors"] = support.vectors.detach().cpu().contiguous()  # float32 or float16
        tensors["support.labels"] = support.labels.long().contiguous()
        tensors["support.predictions"] = support.predictions.long().contiguous()
        config["support"] = {
            "size": support.size,
            "has_ids": support.ids is not None,
            "has_texts": support.texts is not None,
        }
        if support.ids is not None or support.texts is not None:
            documents = [
                {
                    "id": None if support.ids is None else support.ids[i],
                    "text": None if support.texts is None else support.texts[i],
                }
                for i in range(support.size)
            ]
    cal = state.calibration
    if cal is not None:
        tensors.update(
            {
                "calibration.labels": cal.labels.long(),
                "calibration.predictions": cal.predictions.long(),
                "calibration.probabilities": cal.probabilities.float(),
                "calibration.q": cal.q.long(),
                "calibration.d": cal.d.float(),
                "calibration.d_nearest": cal.d_nearest.float(),
                "calibration.rescaled_similarity": cal.rescaled_similarity.float(),
            }
        )
        values, offsets = _flatten(cal.distance_lists, torch.float32)
        tensors["calibration.distance_lists"], tensors["calibration.distance_list_offsets"] = values, offsets
        values, offsets = _flatten(cal.rescaled_lists, torch.float64)
        tensors["calibration.rescaled_lists"], tensors["calibration.rescaled_list_offsets"] = values, offsets
        if cal.features is not None:
            tensors["calibration.features"] = cal.features.float()
        config["calibration"] = {
            "alpha": cal.alpha,
            "q_min": cal.q_min if math.isfinite(cal.q_min) else None,
            "thresholds": [float(v) for v in cal.thresholds.tolist()],
            "stale": cal.stale,
            "has_features": cal.features is not None,
            "size": cal.size,
        }
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    return config, tensors, documents


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: a failure never
    leaves a half-written file under the final name."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_files(
    directory: Path, config: dict, tensors: dict[str, torch.Tensor], documents: list[dict] | None, card: str | None
) -> None:
    """Write a head's files into ``directory`` (created if needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False)
    _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    if documents is not None:
        lines = "".join(json.dumps(d, ensure_ascii=False, allow_nan=False) + "\n" for d in documents)
        _atomic_write(directory / DOCUMENTS_NAME, lambda p: Path(p).write_text(lines, encoding="utf-8"))
    else:
        (directory / DOCUMENTS_NAME).unlink(missing_ok=True)
    if card is not None:
        _atomic_write(directory / CARD_NAME, lambda p: Path(p).write_text(card, encoding="utf-8"))
    # config.json last: a directory with a config.json is a complete head
    _atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(text + "\n", encoding="utf-8"))


# -- reading ------------------------------------------------------------------------------
def _reject_constant(token: str):
    raise ValueError(f"non-standard JSON token {token}")


def read_config(path: Path) -> dict:
    if not path.is_file():
        raise SDMFormatError(path, "missing: this is not an SDM head directory (no config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as err:
        raise SDMFormatError(path, f"not valid strict JSON ({err})") from None
    if not isinstance(config, dict) or FORMAT_KEY not in config:
        raise SDMFormatError(path, f"not an SDM head config (no {FORMAT_KEY!r} key)")
    version = config[FORMAT_KEY]
    if not isinstance(version, int) or isinstance(version, bool):
        raise SDMFormatError(path, f"{FORMAT_KEY} must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise SDMFormatError(
            path,
            f"written by a newer sdm_hf (format version {version}; this sdm_hf reads up to "
            f"{FORMAT_VERSION}); upgrade sdm_hf",
        )
    if version < 1:
        raise SDMFormatError(path, f"unknown format version {version}")
    for key in ("config", "support", "calibration"):
        if key not in config:
            raise SDMFormatError(path, f"missing key {key!r}")
    return config


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise SDMFormatError(path, "missing weights file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise SDMFormatError(path, f"not a readable safetensors file ({err})") from None


def read_documents(path: Path, size: int) -> list[dict]:
    if not path.is_file():
        raise SDMFormatError(path, "missing: config.json says the support set stores ids/texts")
    documents = []
    try:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    documents.append(json.loads(line, parse_constant=_reject_constant))
    except (ValueError, UnicodeDecodeError) as err:
        raise SDMFormatError(path, f"not valid JSON lines ({err})") from None
    if len(documents) != size or not all(isinstance(d, dict) for d in documents):
        raise SDMFormatError(path, f"expected {size} JSON objects (one per support row), found {len(documents)}")
    return documents


def read_files(
    fetch: Callable[[str], Path],
) -> tuple[dict, dict[str, torch.Tensor], list[dict] | None, dict[str, Path]]:
    """Read (but do not yet validate the contents of) a head's files.

    Args:
        fetch: callable ``name -> Path`` giving the local path of one of the head's files
            (downloading it first when the head lives on the Hub); only the files the
            config asks for are fetched.

    Returns:
        ``(config, tensors, documents, paths)``.
    """
    paths = {CONFIG_NAME: fetch(CONFIG_NAME)}
    config = read_config(paths[CONFIG_NAME])
    paths[WEIGHTS_NAME] = fetch(WEIGHTS_NAME)
    tensors = read_tensors(paths[WEIGHTS_NAME])
    documents = None
    support = config.get("support")
    if isinstance(support, dict) and (support.get("has_ids") or support.get("has_texts")):
        paths[DOCUMENTS_NAME] = fetch(DOCUMENTS_NAME)
        documents = read_documents(paths[DOCUMENTS_NAME], int(support.get("size", -1)))
    return config, tensors, documents, paths


_FINITE_CHUNK = 1 << 24  # elements checked at a time: a bounded mask, whatever the tensor's size


def _all_finite(value: torch.Tensor) -> bool:
    flat = value.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + _FINITE_CHUNK]).all()) for i in range(0, flat.numel(), _FINITE_CHUNK))


class TensorChecker:
    """Validates stored tensors against what the config says, naming the file on failure."""

    def __init__(self, path, tensors: dict[str, torch.Tensor]):
        self.path = path
        self.tensors = tensors
        self.used: set[str] = set()

    def fail(self, problem: str):
        raise SDMFormatError(self.path, problem)

    def get(self, name: str, dtype: torch.dtype, shape: tuple, finite: bool = True, copy: bool = True) -> torch.Tensor:
        """The validated tensor ``name``. ``copy=True`` returns a copy: tensors read by
        safetensors share ONE memory map of the file, so keeping any of them (labels, say)
        would keep the whole file mapped and its read pages resident (at 10^6 x 1000 float16
        exemplars, 1.9 GiB beside FAISS's own copy). Pass ``copy=False`` only for a tensor
        that is consumed and released while loading (the support vectors)."""
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

    def labels(self, name: str, length: int | None, num_classes: int) -> torch.Tensor:
        value = self.get(name, torch.int64, (length,))
        if value.numel() and (int(value.min()) < 0 or int(value.max()) >= num_classes):
            self.fail(f"tensor {name!r} has values outside 0..{num_classes - 1}")
        return value

    def lists(self, name: str, dtype, num_classes: int, total: int | None = None) -> list[torch.Tensor]:
        values = self.get(name, dtype, (total,))
        offsets = self.get(name.replace("_lists", "_list_offsets"), torch.int64, (num_classes + 1,))
        if int(offsets[0]) != 0 or int(offsets[-1]) != values.numel() or bool((offsets[1:] < offsets[:-1]).any()):
            self.fail(f"tensor {name!r}: offsets do not partition the {values.numel()} values")
        out = [values[int(a) : int(b)] for a, b in zip(offsets[:-1], offsets[1:])]
        if any(t.numel() > 1 and bool((t[1:] < t[:-1]).any()) for t in out):
            self.fail(f"tensor {name!r}: a class's list is not sorted")
        return out

    def finish(self) -> None:
        unexpected = sorted(set(self.tensors) - self.used)
        if unexpected:
            self.fail(f"unexpected tensor(s) {unexpected}")


def state_from_files(
    config: dict, tensors: dict, documents: list[dict] | None, paths: dict | None = None
) -> SDMHeadState:
    """Validate what :func:`read_files` returned and turn it into an :class:`SDMHeadState`.

    Args:
        config, tensors, documents: the parsed ``config.json``, the safetensors tensors and
            the support documents (or None).
        paths: file name -> where it came from, for error messages (default: the bare names).
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
            labels=check.labels("support.labels", n, c),
            predictions=check.labels("support.predictions", n, c),
        )
        if documents is not None:
            support.ids = [doc.get("id") for doc in documents] if support_info.get("has_ids") else None
            support.texts = [doc.get("text") for doc in documents] if support_info.get("has_texts") else None

    calibration = None
    cal_info = config["calibration"]
    if cal_info is not None:
        if support_info is None:
            raise SDMFormatError(config_path, "a calibration is stored without a support set")
        calibration = _calibration_from_files(cal_info, check, config_path, c, d_in)
    check.finish()
    selection = dict(config["selection"]) if config.get("selection") is not None else None
    return SDMHeadState(sdm_config, weights, support, calibration, selection)


def _calibration_from_files(cal_info: dict, check: TensorChecker, config_path, c: int, d_in: int) -> CalibrationState:
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
    )
    if bool((cal.q < 0).any()):
        check.fail("tensor 'calibration.q' has negative values")
    _check_calibration_consistency(cal, check, config_path)
    return cal


def _check_calibration_consistency(cal: CalibrationState, check: TensorChecker, config_path) -> None:
    """Recompute what the stored calibration arrays determine and compare it with what is
    stored: every step is deterministic, so a head whose files do not belong together (a
    config.json of one head beside the tensors of another, or edited values) is refused
    instead of loading with thresholds that do not describe its arrays. Cost O(N log N)."""
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
    q_min, thresholds = high_reliability_thresholds(
        cal.true_class_probability, cal.rescaled_similarity, cal.labels, c, cal.alpha
    )
    same_q_min = q_min == cal.q_min or (math.isinf(q_min) and math.isinf(cal.q_min))
    if not same_q_min or not torch.equal(thresholds, cal.thresholds):
        raise SDMFormatError(
            config_path,
            f"'q_min' / 'thresholds' ({cal.q_min}, {cal.thresholds.tolist()}) are not what Algorithm 1 gives on "
            f"the stored calibration arrays at alpha={cal.alpha} ({q_min}, {thresholds.tolist()}): the config and "
            "the tensors do not belong to the same head; save it again",
        )
