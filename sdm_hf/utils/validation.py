"""Input checks shared by the user-facing entry points, and the array types they accept.

Each check raises ``TypeError`` (wrong kind of object) or ``ValueError`` (wrong content) naming the
argument and what to do, before anything reaches torch or FAISS.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any, TypeAlias

import numpy as np
import torch

#: A tensor, a numpy array or a (nested) sequence of numbers.
ArrayLike: TypeAlias = torch.Tensor | np.ndarray | Sequence[Any]
#: ``[N, D]`` features as a tensor, a numpy array or a nested list of numbers.
FeaturesLike: TypeAlias = ArrayLike
#: ``[N]`` integer class labels as a tensor, a numpy array or a list of ints.
LabelsLike: TypeAlias = ArrayLike


def as_features(x: FeaturesLike, name: str, dim: int | None = None) -> torch.Tensor:
    """``x`` (tensor, ndarray or nested list) as an ``(N, D)`` float32 tensor on ``x``'s device (CPU otherwise).

    Raises:
        TypeError: not an array of real numbers.
        ValueError: not 2-D, ``D != dim``, or NaN/infinite values.
    """
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
            raise TypeError(f"{name} must hold real numbers, got numpy dtype {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
        try:
            x = torch.as_tensor(np.asarray(x, dtype=np.float32))
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be a 2-D array of numbers: {err}") from None
    elif not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array of shape [n, features], got {type(x).__name__}")
    if x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [n, features], got shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(
            f"{name} has {x.shape[1]} features per row but the head expects input_dim={dim}; "
            "pass features from the same model/pooling the head was built for"
        )
    x = x.detach().float()
    if x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise ValueError(f"{name} contains NaN or infinite values in {bad} row(s); clean them first")
    return x


def as_labels(y: LabelsLike, name: str, num_classes: int, length: int | None = None) -> torch.Tensor:
    """``y`` as an ``(N,)`` int64 CPU tensor with values in ``0..num_classes-1``.

    Raises:
        TypeError: not an array of integers (strings, bools, fractions).
        ValueError: not 1-D, out of range, or ``N != length``.
    """
    if isinstance(y, Sequence) and not isinstance(y, (str, bytes)):
        y = np.asarray(y)
    if isinstance(y, np.ndarray):
        if y.size and not (np.issubdtype(y.dtype, np.number) or np.issubdtype(y.dtype, np.bool_)):
            raise TypeError(
                f"{name} must hold integer class indices 0..C-1, got values of numpy dtype {y.dtype} (e.g. "
                f"{y.flat[0]!r}); map them to 0..C-1 and pass the names as SDMConfig(id2label=...)"
            )
        y = torch.from_numpy(np.ascontiguousarray(y))
    elif not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D tensor/array of integer labels, got {type(y).__name__}")
    if y.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(y.shape)}")
    if y.dtype.is_floating_point:
        if y.numel() and not bool(torch.all(torch.isfinite(y) & (y == torch.round(y)))):
            raise TypeError(f"{name} must hold integer class indices, got non-integer values")
    elif y.dtype == torch.bool or y.is_complex():
        raise TypeError(f"{name} must hold integer class indices 0..{num_classes - 1}, got {y.dtype}")
    y = y.detach().long().cpu()
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"{name} must be in 0..{num_classes - 1} (num_classes={num_classes}); found "
            f"values from {int(y.min())} to {int(y.max())}"
        )
    if length is not None and y.numel() != length:
        raise ValueError(f"{name} has {y.numel()} labels but the features have {length} rows")
    return y


def check_class_counts(y: torch.Tensor, name: str, num_classes: int, minimum: int = 2) -> None:
    """Raise ``ValueError`` unless every class has at least ``minimum`` points in ``y`` (``(N,)`` int64)."""
    counts = torch.bincount(y, minlength=num_classes)
    short = [c for c in range(num_classes) if int(counts[c]) < minimum]
    if short:
        listing = ", ".join(f"class {c}: {int(counts[c])}" for c in short)
        raise ValueError(
            f"{name} needs at least {minimum} points of every class ({listing}); "
            "add data for those classes or reduce num_classes"
        )


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float in (0.5, 1]; ``TypeError`` for a non-number, ``ValueError`` outside the range."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a float in (0.5, 1], got {type(alpha).__name__}")
    alpha = float(alpha)
    if not (math.isfinite(alpha) and 0.5 < alpha <= 1.0):
        raise ValueError(f"alpha must satisfy 0.5 < alpha <= 1, got {alpha}")
    return alpha


def check_positive_int(value: int, name: str, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``; ``TypeError`` for a non-integer, ``ValueError`` below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_optional_list(values: Iterable[Any] | None, name: str, length: int) -> list | None:
    """``values`` as a list (None stays None); ``ValueError`` unless it has ``length`` entries."""
    if values is None:
        return None
    values = list(values)
    if len(values) != length:
        raise ValueError(f"{name} has {len(values)} entries but the features have {length} rows")
    return values


def looks_like_repo_id(name: str) -> bool:
    """Whether ``name`` can be a Hub repo id (``name`` or ``namespace/name``), not only a local path."""
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None and not name.startswith((".", "/", "~"))


def check_local_or_repo(name, what: str) -> None:
    """Raise ``FileNotFoundError`` (naming ``what``) when ``name`` is a missing path that cannot be a repo id."""
    path = os.path.expanduser(str(name))
    if os.path.exists(path) or looks_like_repo_id(str(name)):
        return
    raise FileNotFoundError(
        f"no such folder: {str(name)!r} ({what}; relative paths start from {os.getcwd()}); "
        "give an existing folder or a Hub repo id"
    )


def hub_failure(name, what: str, err: BaseException) -> FileNotFoundError:
    """The ``FileNotFoundError`` for a ``name`` that is no local folder and failed as a Hub repo id: it gives
    both readings and why the Hub failed (offline, not found or private, no connection)."""
    text = str(err)
    kind = type(err).__name__
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or "offline" in text.lower():
        reason = "is not in the local Hugging Face cache and the Hub is offline (HF_HUB_OFFLINE)"
    elif kind == "RepositoryNotFoundError" or "not a valid model identifier" in text or "Repository Not Found" in text:
        reason = "does not exist on the Hub (or is private or gated: log in or pass a token)"
    elif kind == "LocalEntryNotFoundError" or "connect" in text.lower():
        reason = "could not be fetched: the Hub cannot be reached and it is not in the local cache"
    else:
        reason = f"could not be fetched ({kind}: {text.splitlines()[0] if text else ''})"
    return FileNotFoundError(
        f"{what}: {str(name)!r} is not a local folder (relative paths start from {os.getcwd()}), "
        f"and as a Hub repo id it {reason}"
    )


@contextlib.contextmanager
def explained_hub_failure(name, what: str):
    """:func:`check_local_or_repo`, then an ``OSError`` of the block re-raised as :func:`hub_failure` when
    ``name`` is not an existing local path."""
    check_local_or_repo(name, what)
    try:
        yield
    except OSError as err:
        if os.path.exists(os.path.expanduser(str(name))):
            raise
        raise hub_failure(name, what, err) from None
