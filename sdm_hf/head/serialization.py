"""On-disk format of an SDM head (:data:`FORMAT_VERSION`, the only one read or written): strict JSON and
safetensors, never pickle; converts an :class:`~sdm_hf.head.state.SDMHeadState` to and from files or bytes.

* ``model.safetensors``: the whole head (weights, support set, calibration arrays, class-wise lists
  flattened with offsets, support documents as a uint8 tensor of JSON lines), the config JSON in its
  metadata. Loading reads only this file.
* ``config.json``: a strict-JSON mirror of that config (``q_min`` null when infinite), read first to refuse
  anything else; ``support_documents.jsonl`` (mirror, when ids or texts exist) and ``README.md``.

Every problem raises :class:`SDMFormatError` naming the file. Design: docs/serving.md, section 'How saves
stay safe'.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save, save_file

from ..utils.files import STALE_SECONDS, atomic_write, atomic_write_text, loads_strict, remove_stale_temporaries
from .format_errors import SDMFormatError
from .serialization_checks import CONFIG_NAME, WEIGHTS_NAME, TensorChecker, state_from_files
from .state import SDMHeadState

# The one on-disk format; any other version is refused with what to do.
FORMAT_VERSION = 5
DOCUMENTS_NAME = "support_documents.jsonl"
CARD_NAME = "README.md"
FORMAT_KEY = "sdm_hf_format_version"
EMBEDDED_CONFIG_KEY = "sdm_hf_config"
DOCUMENTS_TENSOR = "support.documents"

__all__ = [
    "SDMFormatError",
    "TensorChecker",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "FORMAT_VERSION",
    "state_to_files",
    "state_from_files",
    "state_to_bytes",
    "state_from_bytes",
    "read_files",
    "write_files",
    "SELECTION_KEYS",
]

# config.json keeps these (calibration_source: what the calibration rows were drawn from, when recorded)
SELECTION_KEYS = ("shuffle", "epoch", "calibration_loss", "procedure", "chosen", "reason", "calibration_source")


# -- writing ------------------------------------------------------------------------------
def _flatten(lists: list[torch.Tensor], dtype) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.cat([t.to(dtype) for t in lists]) if lists else torch.zeros(0, dtype=dtype)
    offsets = torch.tensor([0] + [t.numel() for t in lists], dtype=torch.long).cumsum(0)
    return values.contiguous(), offsets


def state_to_files(state: SDMHeadState | Any) -> tuple[dict, dict[str, torch.Tensor], list[dict] | None]:
    """What the files hold for ``state``.

    Args:
        state: an :class:`SDMHeadState`, or a head (anything with ``to_state(copy=...)``).

    Returns:
        ``(config_json, tensors, documents or None)``; the tensors share memory with the state (the support
        vectors can be gigabytes): write them at once.

    Raises:
        TypeError: ``state`` is neither.
    """
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


def documents_text(documents: list[dict]) -> str:
    """The support documents as JSON lines (one object per support row)."""
    return "".join(json.dumps(d, ensure_ascii=False, allow_nan=False) + "\n" for d in documents)


def _pack(
    config: dict, tensors: dict[str, torch.Tensor], documents: list[dict] | None
) -> tuple[dict[str, torch.Tensor], dict[str, str], str, str | None]:
    """``(tensors, metadata, config text, documents text)`` of the self-contained safetensors form."""
    text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False)
    lines = None if documents is None else documents_text(documents)
    stored = dict(tensors)
    if lines is not None:
        stored[DOCUMENTS_TENSOR] = torch.frombuffer(bytearray(lines.encode("utf-8")), dtype=torch.uint8)
    return stored, {"format": "pt", EMBEDDED_CONFIG_KEY: text}, text, lines


def _unpack(
    tensors: dict[str, torch.Tensor], embedded: str, where
) -> tuple[dict, dict[str, torch.Tensor], list[dict] | None]:
    """The config, tensors and documents of the self-contained form (inverse of :func:`_pack`)."""
    config = parse_config(embedded, where)
    support = config.get("support")
    documents = None
    raw = tensors.pop(DOCUMENTS_TENSOR, None)
    if isinstance(support, dict) and (support.get("has_ids") or support.get("has_texts")):
        if raw is None:
            raise SDMFormatError(where, f"missing tensor {DOCUMENTS_TENSOR!r}")
        try:
            text = bytes(raw.numpy()).decode("utf-8")
        except UnicodeDecodeError as err:
            raise SDMFormatError(where, f"{DOCUMENTS_TENSOR!r} is not UTF-8 ({err})") from None
        documents = parse_documents(text, where, int(support.get("size", -1)))
    elif raw is not None:
        raise SDMFormatError(where, f"unexpected tensor {DOCUMENTS_TENSOR!r}")
    return config, tensors, documents


def state_to_bytes(state: SDMHeadState | Any) -> bytes:
    """The whole head as the bytes of ``model.safetensors``: for sending it between processes without pickle."""
    stored, metadata, _, _ = _pack(*state_to_files(state))
    return save(stored, metadata=metadata)


def state_from_bytes(data: bytes, where: str = "<bytes>") -> SDMHeadState:
    """The head stored by :func:`state_to_bytes`, checked like one read from files (``SDMFormatError``)."""
    try:
        header_length = int.from_bytes(data[:8], "little")  # the safetensors layout: u64 + JSON header
        embedded = json.loads(data[8 : 8 + header_length]).get("__metadata__", {}).get(EMBEDDED_CONFIG_KEY)
        tensors = load(data)
    except (SafetensorError, ValueError) as err:
        raise SDMFormatError(where, f"not a readable safetensors buffer ({err})") from None
    if embedded is None:
        raise SDMFormatError(where, f"no embedded config ({EMBEDDED_CONFIG_KEY!r} metadata)")
    config, tensors, documents = _unpack(tensors, embedded, where)
    return state_from_files(config, tensors, documents, {CONFIG_NAME: where, WEIGHTS_NAME: where})


def write_files(
    directory: Path, config: dict, tensors: dict[str, torch.Tensor], documents: list[dict] | None, card: str | None
) -> None:
    """Write a head's files into ``directory`` (created if needed), each atomically, ``model.safetensors``
    first: its rename is the one switch from the old head to the new.

    Raises:
        OSError: a write failed (e.g. a full disk); the folder loads as the old head or the new one.
    """
    directory.mkdir(parents=True, exist_ok=True)
    remove_leftovers(directory)
    stored, metadata, text, lines = _pack(config, tensors, documents)
    atomic_write(directory / WEIGHTS_NAME, lambda p: _save_safetensors(stored, p, metadata))
    # the mirrors, for people and tools that read the folder; loading does not depend on them
    if lines is not None:
        atomic_write_text(directory / DOCUMENTS_NAME, lines)
    else:
        (directory / DOCUMENTS_NAME).unlink(missing_ok=True)
    if card is not None:
        atomic_write_text(directory / CARD_NAME, card)
    atomic_write_text(directory / CONFIG_NAME, text + "\n")


def _save_safetensors(stored: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``save_file``, with its I/O failures (a full disk, a file size limit) as ``OSError``."""
    try:
        save_file(stored, str(path), metadata=metadata)
    except SafetensorError as err:
        if "I/O error" in str(err):
            raise OSError(f"could not write {path.name}: {err}") from None
        raise


def remove_leftovers(directory: Path, older_than: float = STALE_SECONDS) -> None:
    """Delete the ``.<name>.*.tmp`` of killed saves in ``directory``, never those of a save in progress."""
    remove_stale_temporaries(directory, older_than=older_than)


# -- reading ------------------------------------------------------------------------------
def read_config(path: Path) -> dict:
    """The checked head config in ``path`` (``config.json``); ``SDMFormatError`` if missing or invalid."""
    if not path.is_file():
        raise SDMFormatError(path, "missing: this is not an SDM head directory (no config.json)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SDMFormatError(path, f"not valid strict JSON ({err})") from None
    return parse_config(text, path)


def parse_config(text: str, path) -> dict:
    """A head config from its JSON text, checked (strict JSON, format version, keys); else ``SDMFormatError``."""
    try:
        config = loads_strict(text)
    except ValueError as err:
        raise SDMFormatError(path, f"not valid strict JSON ({err})") from None
    if not isinstance(config, dict) or FORMAT_KEY not in config:
        raise SDMFormatError(path, f"not an SDM head config (no {FORMAT_KEY!r} key)")
    version = config[FORMAT_KEY]
    if not isinstance(version, int) or isinstance(version, bool):
        raise SDMFormatError(path, f"{FORMAT_KEY} must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise SDMFormatError(
            path,
            f"written by a newer sdm_hf (format version {version}; this sdm_hf reads format {FORMAT_VERSION}); "
            "upgrade sdm_hf",
        )
    if version != FORMAT_VERSION:
        raise SDMFormatError(
            path,
            f"format version {version} was written by a pre-release sdm_hf; this sdm_hf reads format "
            f"{FORMAT_VERSION} only: fit the head again (or load it with the sdm_hf that wrote it and save it again)",
        )
    for key in ("config", "support", "calibration"):
        if key not in config:
            raise SDMFormatError(path, f"missing key {key!r}")
    return config


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, both from one open descriptor, so a concurrent save
    cannot mix two versions; ``SDMFormatError`` if missing or unreadable."""
    if not path.is_file():
        raise SDMFormatError(path, "missing weights file")
    # safetensors reopens the file by name to map the data: /proc/self/fd/N pins one inode for header and data
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        raise SDMFormatError(path, f"cannot be opened ({err})") from None
    try:
        pinned = next((f"{base}/{fd}" for base in ("/proc/self/fd", "/dev/fd") if os.path.exists(f"{base}/{fd}")), None)
        with safe_open(pinned or str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise SDMFormatError(path, f"not a readable safetensors file ({err})") from None
    finally:
        os.close(fd)
    return tensors, metadata


def parse_documents(text: str, path, size: int) -> list[dict]:
    """The ``size`` support documents from JSON lines (one object per row); else ``SDMFormatError``."""
    documents = []
    try:
        for line in text.splitlines():
            if line.strip():
                documents.append(loads_strict(line))
    except ValueError as err:
        raise SDMFormatError(path, f"not valid JSON lines ({err})") from None
    if len(documents) != size or not all(isinstance(d, dict) for d in documents):
        raise SDMFormatError(path, f"expected {size} JSON objects (one per support row), found {len(documents)}")
    return documents


def read_files(
    fetch: Callable[[str], Path],
) -> tuple[dict, dict[str, torch.Tensor], list[dict] | None, dict[str, Path]]:
    """Read, but do not yet validate, a head's files: ``config.json`` first (is it a head of this format?),
    then everything from ``model.safetensors`` alone, so all of it comes from one save.

    Args:
        fetch: ``name -> Path``, the local path of one of the head's files (downloaded if needed).

    Returns:
        ``(config, tensors, documents, paths)``.

    Raises:
        SDMFormatError: a file is missing, unreadable or of another format.

    Warns:
        UserWarning: ``config.json`` differs from the config in ``model.safetensors`` (which is used).
    """
    paths = {CONFIG_NAME: fetch(CONFIG_NAME)}
    mirror = read_config(paths[CONFIG_NAME])
    paths[WEIGHTS_NAME] = fetch(WEIGHTS_NAME)
    tensors, metadata = read_tensors(paths[WEIGHTS_NAME])
    embedded = metadata.get(EMBEDDED_CONFIG_KEY)
    if embedded is None:
        raise SDMFormatError(
            paths[WEIGHTS_NAME],
            f"no embedded config ({EMBEDDED_CONFIG_KEY!r} metadata): not a head of format {FORMAT_VERSION}",
        )
    config, tensors, documents = _unpack(tensors, embedded, paths[WEIGHTS_NAME])
    if mirror != config:  # model.safetensors is authoritative: config.json may be mid-update
        warnings.warn(
            f"{paths[CONFIG_NAME]} differs from the config stored in {paths[WEIGHTS_NAME]} (a save in "
            "progress or interrupted, or an edit by hand); the head is loaded from model.safetensors, "
            "which is always one complete save",
            UserWarning,
            stacklevel=4,
        )
    paths[CONFIG_NAME] = paths[WEIGHTS_NAME]
    return config, tensors, documents, paths
