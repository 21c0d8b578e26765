"""Safe on-disk format of an SDM head: strict JSON + safetensors, nothing else.

This module converts an :class:`~sdm_hf.head.state.SDMHeadState` to and from files; it knows
the state types only (never the head class), so saving, loading and sending a head between
processes all go through the same plain data.

A head directory holds (format 2):

* ``model.safetensors`` — the whole head: the weights and EVERY array (support exemplars with
  true and predicted labels, the per-point calibration arrays, the class-wise distance lists
  and ``q'`` lists, flattened with per-class offsets), the support documents as a ``uint8``
  tensor of JSON lines, and in its metadata the config JSON below. Replacing this one file
  (a rename) switches the head, so a failed, killed or concurrent save leaves the old head or
  the new one, never a mix; it is read through one open descriptor for the same reason.
* ``config.json`` — a mirror of the embedded config, strict JSON (no ``NaN``/``Infinity``;
  ``q'_min = inf`` is ``null``): format version, :class:`~sdm_hf.SDMConfig`, Algorithm 1's
  result (alpha, ``q'_min``, ``psi``) and a few flags. Read first (is this an SDM head, of a
  format this sdm_hf reads?); format-1 heads (no embedded config) are loaded from it.
* ``support_documents.jsonl`` — optional mirror: one ``{"id": ..., "text": ...}`` per support row.
* ``README.md`` — the model card.

Loading never deserialises Python objects and never calls ``torch.load``; the FAISS index is
rebuilt from the stored exemplars. Every problem (missing file, newer format, wrong dtype,
mismatched lengths, non-finite values, unsorted lists, unexpected or missing tensors, a
calibration that does not follow from its arrays) raises :class:`SDMFormatError` naming the
file and the problem (checks in :mod:`sdm_hf.head.serialization_checks`).
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

FORMAT_VERSION = 4
# Format 3 = format 2 whose config has SDMConfig.alphas; format 4 = one whose config has
# SDMConfig.feature_blocks (composed features). A head is written with the lowest version that
# holds its config (heads with neither are format 2), so older sdm_hf reads every head it can
# and says "upgrade" for the others instead of failing on an unknown config field.
BASE_FORMAT_VERSION = 2
ALPHAS_FORMAT_VERSION = 3
FEATURE_BLOCKS_FORMAT_VERSION = 4
DOCUMENTS_NAME = "support_documents.jsonl"
CARD_NAME = "README.md"
FORMAT_KEY = "sdm_hf_format_version"
# Format 2: model.safetensors is self-contained (its metadata holds the config JSON, a
# "support.documents" uint8 tensor the support documents as JSON lines), so replacing that one
# file (an atomic rename) switches the whole head: a reader sees the old head or the new one,
# never a mix, whatever fails or runs concurrently. config.json and support_documents.jsonl are
# written as readable mirrors; format-1 heads (no embedded config) still load from them.
EMBEDDED_CONFIG_KEY = "sdm_hf_config"
DOCUMENTS_TENSOR = "support.documents"

__all__ = [
    "SDMFormatError",
    "TensorChecker",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "FORMAT_VERSION",
    "format_version_of",
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
def format_version_of(config) -> int:
    """The format version a head with ``config`` (an :class:`~sdm_hf.SDMConfig`) is written as:
    the lowest one whose readers know every field it sets."""
    if config.feature_blocks is not None:
        return FEATURE_BLOCKS_FORMAT_VERSION
    return ALPHAS_FORMAT_VERSION if config.alphas else BASE_FORMAT_VERSION


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
        FORMAT_KEY: format_version_of(state.config),
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
    """``(tensors, metadata, config text, documents text)`` of the self-contained safetensors
    form: the config JSON in the metadata, the documents as a uint8 tensor of JSON lines."""
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
    """The whole head as the bytes of one self-contained safetensors file (what
    ``model.safetensors`` holds): for sending a head between processes without pickle."""
    stored, metadata, _, _ = _pack(*state_to_files(state))
    return save(stored, metadata=metadata)


def state_from_bytes(data: bytes, where: str = "<bytes>") -> SDMHeadState:
    """The head stored by :func:`state_to_bytes`, checked like a head read from files."""
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
    """Write a head's files into ``directory`` (created if needed), each through a temporary
    file and a rename. ``model.safetensors`` carries everything a load needs (config in its
    metadata, documents as a tensor), so its rename is the one switch from old to new."""
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
    """Delete what interrupted saves left in ``directory`` (``.<name>.*.tmp``): staging folders
    of killed writers at once, a save in progress in another process never (see
    :func:`sdm_hf.utils.files.remove_stale_temporaries`)."""
    remove_stale_temporaries(directory, older_than=older_than)


# -- reading ------------------------------------------------------------------------------
def read_config(path: Path) -> dict:
    if not path.is_file():
        raise SDMFormatError(path, "missing: this is not an SDM head directory (no config.json)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SDMFormatError(path, f"not valid strict JSON ({err})") from None
    return parse_config(text, path)


def parse_config(text: str, path) -> dict:
    """A head config from its JSON text, checked (strict JSON, format version, keys)."""
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
            f"written by a newer sdm_hf (format version {version}; this sdm_hf reads up to "
            f"{FORMAT_VERSION}); upgrade sdm_hf",
        )
    if version < 1:
        raise SDMFormatError(path, f"unknown format version {version}")
    for key in ("config", "support", "calibration"):
        if key not in config:
            raise SDMFormatError(path, f"missing key {key!r}")
    return config


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, both from ONE open of it (a concurrent
    save that replaces the file cannot mix two versions)."""
    if not path.is_file():
        raise SDMFormatError(path, "missing weights file")
    # safetensors reopens the file BY NAME when it maps the data, after reading the header: a
    # save replacing the file in between would pair the old header with the new bytes. Reading
    # through /proc/self/fd/N (or /dev/fd/N) of one open descriptor pins one inode for both.
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
    """The support documents from JSON lines, one object per support row (``size`` rows)."""
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


def read_documents(path: Path, size: int) -> list[dict]:
    if not path.is_file():
        raise SDMFormatError(path, "missing: config.json says the support set stores ids/texts")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SDMFormatError(path, f"not valid JSON lines ({err})") from None
    return parse_documents(text, path, size)


def read_files(
    fetch: Callable[[str], Path],
) -> tuple[dict, dict[str, torch.Tensor], list[dict] | None, dict[str, Path]]:
    """Read (but do not yet validate the contents of) a head's files.

    ``config.json`` is read first (is this an SDM head, of a format this sdm_hf reads?); the
    head itself is then read from ``model.safetensors`` alone when it embeds its config
    (format 2), so that the config, tensors and documents always come from one save.

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
    tensors, metadata = read_tensors(paths[WEIGHTS_NAME])
    embedded = metadata.get(EMBEDDED_CONFIG_KEY)
    support = config.get("support")
    if embedded is not None:  # the authoritative copy: config.json may be mid-update
        mirror = config
        config, tensors, documents = _unpack(tensors, embedded, paths[WEIGHTS_NAME])
        if mirror != config:
            warnings.warn(
                f"{paths[CONFIG_NAME]} differs from the config stored in {paths[WEIGHTS_NAME]} (a save in "
                "progress or interrupted, or an edit by hand); the head is loaded from model.safetensors, "
                "which is always one complete save",
                UserWarning,
                stacklevel=4,
            )
        paths[CONFIG_NAME] = paths[WEIGHTS_NAME]
        return config, tensors, documents, paths
    documents = None  # a format-1 head (or tensors rewritten without the metadata): the split files
    tensors.pop(DOCUMENTS_TENSOR, None)
    if isinstance(support, dict) and (support.get("has_ids") or support.get("has_texts")):
        paths[DOCUMENTS_NAME] = fetch(DOCUMENTS_NAME)
        documents = read_documents(paths[DOCUMENTS_NAME], int(support.get("size", -1)))
    return config, tensors, documents, paths
