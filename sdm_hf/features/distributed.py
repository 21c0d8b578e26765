"""Features across the processes of one run (``accelerate launch`` / ``torchrun``), used by
``extract_features`` / ``cached_features`` with ``distributed=True`` when there are several processes.

Every process must make the same calls (a call on one process alone waits forever). A failure in one
process's shard is raised in every process, so none is left waiting in a collective.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from accelerate import PartialState

__all__ = [
    "features_across_processes",
    "launched_processes",
    "main_process_cached",
    "process_state",
    "shard_order",
    "texts_sha256",
]

ShardFeatures = Callable[[list[str], bool, str | torch.device | None], torch.Tensor]


def texts_sha256(texts: list[str]) -> str:
    """Hex sha256 over the texts, each prefixed with its UTF-8 byte length (so ["ab", "c"] != ["a", "bc"])."""
    digest = hashlib.sha256()
    digest.update(len(texts).to_bytes(8, "little"))
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def launched_processes() -> int:
    """How many processes this run has: ``torch.distributed``'s world size when initialised, else the
    launcher's ``WORLD_SIZE``, else 1; creates no state and starts no communication."""
    from ..utils.distributed import process_world

    _, world = process_world()
    if world > 1:
        return world
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def _use_cpu() -> bool:
    """Whether accelerate must be told ``cpu=True`` (``accelerate launch --cpu``, or no accelerator)."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return not accelerator.is_available()
    return not torch.cuda.is_available()  # pragma: no cover - torch without torch.accelerator


def process_state() -> PartialState:
    """accelerate's ``PartialState`` of this run (the existing one, else created, which initialises
    ``torch.distributed`` when the launcher has not: gloo on CPU)."""
    from accelerate import PartialState

    return PartialState(cpu=_use_cpu())


def _failure(statuses: list[tuple]) -> tuple[int, str] | None:
    for rank, (ok, _, _, _, message) in enumerate(statuses):
        if not ok:
            return rank, message
    return None


def shard_order(texts: list[str], world: int) -> torch.Tensor:
    """``(N,)`` long text indices, process 0's shard first, then process 1's, ...

    Process ``p``'s shard is ``by_length[p::world]`` (texts by length, longest first, ties in input order),
    so every process gets a similar mix of lengths and ``split_between_processes`` hands exactly these out.
    """
    lengths = torch.tensor([len(t) for t in texts], dtype=torch.long)
    by_length = torch.argsort(lengths, descending=True, stable=True)
    return torch.cat([by_length[p::world] for p in range(world)])


def features_across_processes(
    texts: list[str],
    compute: ShardFeatures,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """The features of ``texts``, each process computing a shard; all of them on every process.

    Args:
        texts: N strings, the same list on every process (checked).
        compute: ``compute(shard_texts, show_progress, device) -> (n, D)`` float32 CPU tensor, one shard's
            features (a single-process :func:`~sdm_hf.features.extract.extract_features`).
        device: where each process runs the model (default: ``PartialState().device``).
        progress: show the main process's progress over its shard.

    Returns:
        ``(N, D)`` float32 CPU tensor in the order of ``texts``, equal on every process.

    Raises:
        ValueError: the processes were given different texts, or their features differ in width.
        RuntimeError: another process failed to compute its shard (its error is named); the failing
            process re-raises its own error.
    """
    from accelerate.utils import gather, pad_across_processes

    from ..utils.distributed import gather_json

    state = process_state()
    run_on = state.device if device is None else device
    world = state.num_processes
    if world == 1:
        return compute(texts, progress, run_on)
    n = len(texts)
    dealt = shard_order(texts, world)
    with state.split_between_processes(dealt) as shard:
        mine = shard.tolist()
    local: torch.Tensor | None = None
    error: Exception | None = None
    try:
        if mine:
            local = compute([texts[i] for i in mine], progress and state.is_main_process, run_on)
    except Exception as err:  # raised below, after every process knows (no one waits forever)
        error = err
    status = (
        error is None,
        len(mine),
        None if local is None else int(local.shape[1]),
        texts_sha256(texts),
        "" if error is None else f"{type(error).__name__}: {error}",
    )
    statuses = [tuple(s) for s in gather_json(list(status), (state.process_index, world))]  # JSON, not pickle
    failed = _failure(statuses)
    if error is not None:
        raise error
    if failed is not None:
        raise RuntimeError(f"feature extraction failed on process {failed[0]} of {world}: {failed[1]}")
    if len({s[3] for s in statuses}) != 1 or sum(s[1] for s in statuses) != n:
        raise ValueError(
            "the processes were given different texts: pass every process the same list (the shards are "
            "taken here); to compute features of each process's own texts, pass distributed=False"
        )
    dims = {s[2] for s in statuses if s[2] is not None}
    if len(dims) != 1:
        raise ValueError(f"the processes' features differ in width ({sorted(dims)}): load the same model everywhere")
    dim = dims.pop()
    if local is None:
        local = torch.zeros(0, dim)
    # NCCL moves only tensors on the process's GPU; gloo CPU tensors (state.device is the CPU then)
    padded = pad_across_processes(local.float().to(state.device), dim=0)
    everything = gather(padded).cpu()  # [world * longest, dim], process by process
    longest = padded.shape[0]
    rows = torch.cat([torch.arange(p * longest, p * longest + s[1]) for p, s in enumerate(statuses)])
    result = torch.empty(n, dim)
    result[dealt] = everything[rows]
    return result


def main_process_cached(
    load: Callable[[], torch.Tensor | None],
    compute: Callable[[], torch.Tensor],
    store: Callable[[torch.Tensor], None],
) -> torch.Tensor:
    """A cached tensor with the main process as the cache's only reader and writer: a hit is broadcast, a miss
    is computed by every process and stored by the main one while the others wait.

    Args:
        load: the cached tensor, or None on a miss (called on the main process only).
        compute: the tensor, computed by every process together (e.g. through
            :func:`features_across_processes`); called on every process on a miss.
        store: writes the tensor to the cache (called on the main process only, after a miss).

    Returns:
        The float32 CPU tensor, equal on every process. When this returns on any process after a
        miss, the main process has finished ``store``.

    Raises:
        RuntimeError: ``load`` raised on the main process (its error is named).
    """
    from accelerate.utils import broadcast

    from ..utils.distributed import broadcast_json

    state = process_state()
    if state.num_processes == 1:
        found = load()
        if found is None:
            found = compute()
            store(found)
        return found
    found, problem = None, ""
    if state.is_main_process:
        try:
            found = load()
        except Exception as err:  # reported to every process below
            problem = f"{type(err).__name__}: {err}"
    header = [None if found is None else list(found.shape), problem]
    shape, problem = broadcast_json(header, (state.process_index, state.num_processes))
    if problem:
        raise RuntimeError(f"reading the cache failed on the main process: {problem}")
    if shape is not None:  # a hit: the main process's tensor, sent to the others
        if found is None:
            found = torch.empty(*shape, dtype=torch.float32)
        return broadcast(found.float().to(state.device), from_process=0).cpu()
    features = compute()
    try:
        if state.is_main_process:
            store(features)
    finally:
        state.wait_for_everyone()  # the entry is complete wherever this returns
    return features
