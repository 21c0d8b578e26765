"""Messages between the processes of one run (``torchrun`` / ``accelerate launch``): bytes and strict JSON
as uint8 tensors through accelerate's collectives, never pickle.

``world`` is ``(rank, world_size)`` from :func:`process_world`; with one process every function is the
identity and makes no ``torch.distributed`` call (design: docs/serving.md, section 'Design notes: pipelines
and processes').
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = [
    "process_world",
    "wire_device",
    "broadcast_bytes",
    "gather_bytes",
    "broadcast_json",
    "gather_lists",
    "gather_json",
    "gather_rows",
]


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
    """Rank 0's ``data`` on every process (the others pass None)."""
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
    """Every process's ``data``, in rank order, on every process."""
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
    """Every process's ``local`` list, concatenated in rank order, on every process.

    ``local`` travels as strict JSON: strings, finite numbers and lists of them (tuples come back as lists).
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


def process_world(accelerator: Accelerator | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process.

    Args:
        accelerator: the trainer's ``Accelerator`` (knows the launch before ``torch.distributed`` is used);
            without it, the initialised default process group, else ``(0, 1)``.
    """
    if accelerator is not None:
        world = int(getattr(accelerator, "num_processes", 1))
        return (int(accelerator.process_index), world) if world > 1 else (0, 1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_rows(
    n: int, compute: Callable[[list[int]], torch.Tensor], world: tuple[int, int], multiple: int = 1
) -> torch.Tensor:
    """``compute(list(range(n)))``, shared: each process computes one contiguous block of rows, and all
    ``(n, D)`` rows come back in order on every process.

    Blocks are ``ceil(n / P)`` rows rounded up to ``multiple``, padded with repeats so every process makes
    the same calls (FSDP / ZeRO-3 forwards need all processes).

    Args:
        compute: ``rows -> (len(rows), D)`` float CPU tensor (e.g. features of those rows).
        multiple: block sizes are multiples of it (a batch size).
    """
    from accelerate.utils import gather

    rank, size = world
    if size == 1:
        return compute(list(range(n)))
    multiple = max(1, int(multiple))
    share = math.ceil(n / size)  # rows per process, then rounded up to whole batches
    per = max(1, math.ceil(share / multiple) * multiple)
    mine = list(range(rank * per, min(n, (rank + 1) * per)))
    local = compute(mine + [mine[-1] if mine else 0] * (per - len(mine)))
    return gather(local.to(wire_device())).cpu()[:n]  # block r holds rows r*per.. in order
