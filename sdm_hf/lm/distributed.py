"""What :class:`~sdm_hf.lm.SDMTrainer` needs from several processes (accelerate / torchrun).

Three things must agree across processes for the SDM loss to be the same everywhere: which
process is which (:func:`process_world`), the hard negatives every process generated for
its share of the documents (:func:`gather_lists`), and the verification head, which is
fitted once on the main process and sent to the others (:func:`broadcast_head`). With one
process each of these is the identity and touches no ``torch.distributed`` call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..head.modeling import SDMHead
from ..head.state import SDMHeadState
from ..persistence import SELECTION_KEYS

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["broadcast_head", "gather_lists", "process_world"]


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


def gather_lists(local: list, world: tuple[int, int]) -> list:
    """Every process's ``local`` list, concatenated in rank order (the same list on every
    process). ``local`` must hold picklable Python objects (strings, ints, tuples of them):
    they travel through ``torch.distributed.all_gather_object`` between processes of one
    training run, never through files.

    Args:
        world: ``(rank, world_size)`` from :func:`process_world`.
    """
    _, size = world
    if size == 1:
        return list(local)
    parts: list[Any] = [None] * size
    torch.distributed.all_gather_object(parts, list(local))
    return [item for part in parts for item in part]


def broadcast_head(
    head: SDMHead | None, support_row: torch.Tensor, world: tuple[int, int]
) -> tuple[SDMHead | None, torch.Tensor]:
    """The main process's verification head and support-row map, on every process.

    Only rank 0 fits the head (one fit instead of one per process, and no chance of
    processes disagreeing); the other ranks pass whatever they have and receive rank 0's.
    The head travels as its plain state (:meth:`SDMHead.to_state`: config, tensors and lists,
    never the module or its FAISS index) and is rebuilt on CPU with :meth:`SDMHead.from_state`,
    with its training distance lists.

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
    payload: list[Any] = [None]
    if rank == 0:
        payload = [None if head is None else (_shareable_state(head), support_row.tolist())]
    torch.distributed.broadcast_object_list(payload, src=0)
    if payload[0] is None:
        return None, support_row
    state, rows = payload[0]
    head = SDMHead.from_state(state, device="cpu")
    head.compute_training_distance_lists()
    return head, torch.tensor(rows, dtype=torch.long)


def _shareable_state(head: SDMHead) -> SDMHeadState:
    # what the other ranks need to compute the loss, as a saved head would have it: no support
    # documents, and of the training selection only the keys a saved head keeps
    state = head.to_state()
    if state.support is not None:
        state.support.ids = state.support.texts = None
    if state.selection is not None:
        state.selection = {k: state.selection[k] for k in SELECTION_KEYS if k in state.selection}
    return state
