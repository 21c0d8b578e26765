"""The verification head across processes (accelerate / torchrun): fitted once on the main process and
sent to the others (:func:`broadcast_head`), so the SDM loss is the same everywhere.
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
    """Rank 0's verification head and support-row map, on every process (a collective call; with one
    process the identity, no ``torch.distributed`` call).

    The head travels as its saved form (:func:`sdm_hf.head.serialization.state_to_bytes`, no pickle; support
    texts and ids left out) and is rebuilt on CPU with its training distance lists.

    Args:
        head: rank 0's head, or None when no fit was possible; other ranks pass anything.
        support_row: ``(num_document_ids,)`` long, each document id's support row (-1: not in the training half).
        world: ``(rank, world_size)`` from :func:`sdm_hf.utils.distributed.process_world`.

    Returns:
        ``(head, support_row)`` as rank 0 had them; ``(None, support_row)`` (the caller's own) when rank 0
        has no head.
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
