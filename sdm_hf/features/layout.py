"""The layout of composed features: which columns of ``(N, D_1 + ... + D_K)`` came from which model, one
JSON-safe dict per block (pure: no models, no I/O)::

    {"model": "sentence-transformers/all-MiniLM-L6-v2",  # name or path (None: not known)
     "revision": None,                                   # the weights' version (None: not known)
     "pooling": "mean",                                  # None: the model's own (SentenceTransformer)
     "layer": -1,                                        # hidden-state layer as passed (None: not applicable)
     "max_length": 128,                                  # truncation length in tokens (None: not known)
     "dim": 384, "start": 0, "stop": 384}                # columns start:stop of the composed matrix

Blocks are contiguous and in order from column 0 (``stop - start == dim``); the last stops at the
composed width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["BLOCK_KEYS", "DESCRIPTION_KEYS", "check_feature_blocks", "layout_of", "split_feature_blocks"]

#: What describes a block's features (each optional; None when not known or not applicable).
DESCRIPTION_KEYS = ("model", "revision", "pooling", "layer", "max_length")
#: Every key of a layout block, in the order they are written.
BLOCK_KEYS = (*DESCRIPTION_KEYS, "dim", "start", "stop")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_description(block: Mapping, where: str) -> dict:
    out = {}
    for key in ("model", "revision", "pooling"):
        value = block.get(key)
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{where}: {key!r} must be a string or None, got {value!r}")
        out[key] = value
    layer = block.get("layer")
    if layer is not None and not _is_int(layer):
        raise TypeError(f"{where}: 'layer' must be an integer or None, got {layer!r}")
    max_length = block.get("max_length")
    if max_length is not None and (not _is_int(max_length) or max_length < 1):
        raise ValueError(f"{where}: 'max_length' must be an integer >= 1 or None, got {max_length!r}")
    out["layer"], out["max_length"] = layer, max_length
    return out


def check_feature_blocks(blocks, input_dim: int | None = None) -> list[dict]:
    """Validate a layout; return it as new plain dicts with every key of :data:`BLOCK_KEYS` (None where absent).

    Args:
        blocks: a non-empty sequence of block dicts (see the module docstring).
        input_dim: the composed width D; when given, the last block must stop there.

    Raises:
        TypeError: not a sequence of dicts, or a value of the wrong type.
        ValueError: empty, an unknown key, a missing ``dim``/``start``/``stop``, blocks that are
            not contiguous from column 0, or a total width other than ``input_dim``.
    """
    if isinstance(blocks, (str, bytes, Mapping)) or not isinstance(blocks, Sequence):
        raise TypeError(f"feature blocks must be a list of dicts, got {type(blocks).__name__}")
    if not blocks:
        raise ValueError("feature blocks must hold at least one block")
    out, start = [], 0
    for k, block in enumerate(blocks):
        where = f"feature block {k}"
        if not isinstance(block, Mapping):
            raise TypeError(f"{where} must be a dict with keys {list(BLOCK_KEYS)}, got {type(block).__name__}")
        unknown = sorted(set(block) - set(BLOCK_KEYS))
        if unknown:
            raise ValueError(f"{where} has unknown key(s) {unknown}; known keys: {list(BLOCK_KEYS)}")
        missing = [key for key in ("dim", "start", "stop") if key not in block]
        if missing:
            raise ValueError(f"{where} is missing {missing}")
        dim, first, stop = block["dim"], block["start"], block["stop"]
        if not all(_is_int(v) for v in (dim, first, stop)):
            raise TypeError(f"{where}: 'dim', 'start' and 'stop' must be integers, got {dim!r}, {first!r}, {stop!r}")
        if dim < 1 or first != start or stop != first + dim:
            raise ValueError(
                f"{where} must cover columns {start}:{start} + dim with dim >= 1 (blocks are contiguous, "
                f"in order, from column 0), got dim={dim}, start={first}, stop={stop}"
            )
        out.append({**_check_description(block, where), "dim": dim, "start": first, "stop": stop})
        start = stop
    if input_dim is not None and start != input_dim:
        raise ValueError(f"the feature blocks cover {start} columns but the features have {input_dim}")
    return out


def layout_of(dims: Sequence[int], descriptions: Sequence[Mapping | None] | None = None) -> list[dict]:
    """The layout of blocks of widths ``dims`` concatenated in order.

    Args:
        dims: K block widths, each >= 1.
        descriptions: K dicts with any of :data:`DESCRIPTION_KEYS` (missing: None), or None.

    Returns:
        K block dicts (module docstring), checked by :func:`check_feature_blocks`.

    Raises:
        ValueError / TypeError: descriptions of another count, not dicts or with unknown keys, or a bad width.

    Example:
        >>> [(b["start"], b["stop"]) for b in layout_of([3, 2])]
        [(0, 3), (3, 5)]
    """
    dims = list(dims)
    descriptions = [None] * len(dims) if descriptions is None else list(descriptions)
    if len(descriptions) != len(dims):
        raise ValueError(f"got {len(dims)} block widths but {len(descriptions)} descriptions")
    blocks, start = [], 0
    for k, (dim, description) in enumerate(zip(dims, descriptions)):
        description = {} if description is None else description
        if not isinstance(description, Mapping):
            raise TypeError(f"description {k} must be a dict or None, got {type(description).__name__}")
        unknown = sorted(set(description) - set(DESCRIPTION_KEYS))
        if unknown:
            raise ValueError(f"description {k} has unknown key(s) {unknown}; known keys: {list(DESCRIPTION_KEYS)}")
        stop = start + dim if _is_int(dim) else dim
        blocks.append(
            {**{key: description.get(key) for key in DESCRIPTION_KEYS}, "dim": dim, "start": start, "stop": stop}
        )
        start = stop if _is_int(stop) else start
    return check_feature_blocks(blocks)


def split_feature_blocks(features: torch.Tensor, blocks) -> list[torch.Tensor]:
    """Cut composed ``(N, D)`` features into their K blocks ``(N, D_k)`` (views, no copies).

    Raises:
        TypeError / ValueError: ``features`` is not a 2-D tensor, or ``blocks`` is not a valid layout of
            width ``D`` (:func:`check_feature_blocks`).
    """
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise TypeError(f"features must be a 2-D [N, D] tensor, got {getattr(features, 'shape', type(features))}")
    blocks = check_feature_blocks(blocks, input_dim=features.shape[1])
    return [features[:, b["start"] : b["stop"]] for b in blocks]
