"""Messages between the processes of one run (``torchrun`` / ``accelerate launch``), as plain
uint8 tensors through accelerate's ``broadcast`` / ``pad_across_processes`` / ``gather``: bytes,
and strict JSON on top of them. Nothing is pickled on the wire.

``world`` is ``(rank, world_size)``; with one process every function is the identity and makes
no ``torch.distributed`` call.
"""

from __future__ import annotations

import json
from typing import Any

import torch

__all__ = ["wire_device", "broadcast_bytes", "gather_bytes", "broadcast_json", "gather_lists", "gather_json"]


def wire_device() -> torch.device:
    """Where collective buffers must live: the current GPU under NCCL, else the CPU (gloo)."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _as_tensor(data: bytes, device: torch.device) -> torch.Tensor:
    return (
        torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
        if data
        else torch.zeros(0, dtype=torch.uint8, device=device)
    )


def broadcast_bytes(data: bytes | None, world: tuple[int, int]) -> bytes:
    """Rank 0's ``data`` on every process, as plain uint8 tensors through accelerate's
    ``broadcast`` (no pickle on the wire)."""
    from accelerate.utils import broadcast

    rank, size = world
    if size == 1:
        return data or b""
    device = wire_device()
    length = broadcast(torch.tensor([len(data or b"") if rank == 0 else 0], dtype=torch.int64, device=device))
    buffer = (
        _as_tensor(data or b"", device) if rank == 0 else torch.empty(int(length), dtype=torch.uint8, device=device)
    )
    return bytes(broadcast(buffer).cpu().numpy())


def gather_bytes(data: bytes, world: tuple[int, int]) -> list[bytes]:
    """Every process's ``data``, in rank order, on every process: uint8 tensors padded to the
    longest with accelerate's ``pad_across_processes``, then ``gather`` (no pickle on the wire)."""
    from accelerate.utils import gather, pad_across_processes

    _, size = world
    if size == 1:
        return [data]
    device = wire_device()
    lengths = gather(torch.tensor([len(data)], dtype=torch.int64, device=device)).tolist()
    # a 1-byte sentinel keeps every buffer non-empty (padding needs at least one element)
    padded = pad_across_processes(_as_tensor(data + b"\0", device), dim=0)
    parts = gather(padded).view(size, -1).cpu()
    return [bytes(part[: int(n)].numpy()) for part, n in zip(parts, lengths)]


def gather_lists(local: list, world: tuple[int, int]) -> list:
    """Every process's ``local`` list, concatenated in rank order (the same list on every
    process). ``local`` must be JSON-serialisable (strings, numbers, lists of them; tuples come
    back as lists): it travels as strict JSON between the processes of one training run.

    Args:
        world: ``(rank, world_size)`` from :func:`process_world`.
    """
    _, size = world
    if size == 1:
        return list(local)
    parts = gather_bytes(json.dumps(list(local), allow_nan=False).encode("utf-8"), world)
    return [item for part in parts for item in json.loads(part)]


def broadcast_json(value: Any, world: tuple[int, int]) -> Any:
    """Rank 0's JSON-serialisable ``value`` on every process (the others' are ignored)."""
    rank, size = world
    if size == 1:
        return value
    data = broadcast_bytes(json.dumps(value).encode("utf-8") if rank == 0 else None, world)
    return json.loads(data)


def gather_json(value: Any, world: tuple[int, int]) -> list:
    """Every process's JSON-serialisable ``value``, in rank order, on every process."""
    if world[1] == 1:
        return [value]
    return [json.loads(part) for part in gather_bytes(json.dumps(value, allow_nan=False).encode("utf-8"), world)]
