"""What :class:`~sdm_hf.lm.SDMTrainer` needs from several processes (accelerate / torchrun).

Three things must agree across processes for the SDM loss to be the same everywhere: which
process is which (:func:`process_world`), the hard negatives every process generated for
its share of the documents (:func:`gather_lists`), and the verification head, which is
fitted once on the main process and sent to the others (:func:`broadcast_head`). With one
process each of these is the identity and touches no ``torch.distributed`` call.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from ..collectives import broadcast_bytes, broadcast_json, gather_bytes, gather_lists, wire_device
from ..head.modeling import SDMHead
from ..persistence import state_from_bytes, state_to_bytes

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = [
    "broadcast_bytes",
    "broadcast_head",
    "broadcast_json",
    "gather_bytes",
    "gather_lists",
    "gather_rows",
    "process_world",
]


def process_world(accelerator: Accelerator | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process.

    Args:
        accelerator: the trainer's ``accelerate.Accelerator`` (``trainer.accelerator``), which
            knows the launch even before ``torch.distributed`` is used; without it, the default
            ``torch.distributed`` process group if one is initialised, else ``(0, 1)``.
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
    """``compute(range(n))`` with the work shared: process ``r`` computes the rows of its
    contiguous block (``ceil(n / P)`` rows rounded up to a ``multiple``, so that blocks hold
    whole batches; padded with repeats of its last row, or of row 0, so every process makes
    the same calls: under FSDP / ZeRO-3 every forward needs them all), and accelerate's
    ``gather`` returns all ``[n, D]`` rows in order on every process.

    Args:
        compute: ``rows -> [len(rows), D]`` float CPU tensor (e.g. features of those rows).
        world: ``(rank, world_size)`` from :func:`process_world`.
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


def broadcast_head(
    head: SDMHead | None, support_row: torch.Tensor, world: tuple[int, int]
) -> tuple[SDMHead | None, torch.Tensor]:
    """The main process's verification head and support-row map, on every process.

    Only rank 0 fits the head (one fit instead of one per process, and no chance of
    processes disagreeing); the other ranks pass whatever they have and receive rank 0's.
    The head travels as the bytes of its saved form (:func:`sdm_hf.persistence.state_to_bytes`:
    one safetensors buffer, never a pickled module or FAISS index; the support documents are
    left out), is checked like a loaded head and rebuilt on CPU with its training distance lists.

    Args:
        head: rank 0's head, or None when too few documents of a class allowed no fit.
        support_row: ``[num_document_ids]`` long tensor, the support row of every document
            id in the head's training half (-1 elsewhere).
        world: ``(rank, world_size)`` from :func:`process_world`.

    Returns:
        ``(head, support_row)`` as rank 0 had them.
    """
    rank, size = world
    if size == 1:
        return head, support_row
    payload = None
    if rank == 0 and head is not None:
        state = head.to_state(copy=False)
        if state.support is not None:  # the other ranks compute the loss: no documents needed
            state.support = replace(state.support, ids=None, texts=None)
        payload = state_to_bytes(state)
    data = broadcast_bytes(payload, world)
    if not data:
        return None, support_row
    rows = broadcast_bytes(json.dumps(support_row.tolist()).encode("utf-8") if rank == 0 else None, world)
    head = SDMHead.from_state(state_from_bytes(data, "<broadcast head>"), device="cpu")
    head.compute_training_distance_lists()
    return head, torch.tensor(json.loads(rows), dtype=torch.long)
