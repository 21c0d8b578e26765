"""The verification head across processes (accelerate / torchrun): fitted once on the main
process and sent to the others (:func:`broadcast_head`), so the SDM loss is the same everywhere.
Which process is which and the generic row and list collectives are in
:mod:`sdm_hf.utils.distributed`. With one process it is the identity and touches no
``torch.distributed`` call.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from ..head.modeling import SDMHead
from ..head.serialization import state_from_bytes, state_to_bytes
from ..utils.distributed import broadcast_bytes

if TYPE_CHECKING:
    pass

__all__ = ["broadcast_head"]


def broadcast_head(
    head: SDMHead | None, support_row: torch.Tensor, world: tuple[int, int]
) -> tuple[SDMHead | None, torch.Tensor]:
    """The main process's verification head and support-row map, on every process.

    Only rank 0 fits the head (one fit instead of one per process, and no chance of
    processes disagreeing); the other ranks pass whatever they have and receive rank 0's.
    The head travels as the bytes of its saved form (:func:`sdm_hf.head.serialization.state_to_bytes`:
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
