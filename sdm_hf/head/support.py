"""The support set of an SDM head: training exemplars behind a FAISS index, with labels, predictions, ids, texts.

Similarity ``q`` (Schmaltz (2025), Similarity-Distance-Magnitude Activations, arXiv:2509.12760): the
length of the unbroken run of nearest exemplars with ``label = prediction = y_hat(query)``; the nearest
exemplar's squared L2 distance feeds the Distance quantile ``d``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..maths.distance import class_distance_lists
from ..maths.similarity import SimilarityResult, compute_similarity
from ..search.index import SupportIndex
from ..utils import validation as check
from .config import SDMConfig
from .state import SupportState

# Label of a known out-of-distribution support row: it never equals a prediction, so a query whose
# nearest exemplar is such a row has q = 0, and the class-wise distance lists skip it.
OOD_LABEL = -1

__all__ = ["OOD_LABEL", "SupportSet"]


def new_support_labels(y: Any, n: int, num_classes: int, ood: bool) -> torch.Tensor:
    """``(n,)`` int64 labels of rows to add: ``y`` checked against ``0..C-1``, or ``OOD_LABEL`` with ``ood=True``.

    Raises:
        ValueError: ``y`` given with ``ood=True``, or missing without it; a bad label.
    """
    if ood != (y is None):
        raise ValueError("pass labels y for in-distribution points, or ood=True without y for known OOD points")
    return torch.full((n,), OOD_LABEL) if ood else check.as_labels(y, "y", num_classes, length=n)


class SupportSet:
    """Exemplars ``(N, M)`` in a :class:`~sdm_hf.search.index.SupportIndex`, plus per-row ids / texts.

    Searchable directly by :func:`sdm_hf.maths.similarity.compute_similarity` (``ntotal``, ``search``,
    ``pair_distances``).

    Raises:
        TypeError: ``index`` is not a SupportIndex. ValueError: ``ids`` / ``texts`` not one per row.

    Example:
        >>> import torch
        >>> from sdm_hf import SDMConfig
        >>> cfg = SDMConfig(input_dim=4, exemplar_dim=3)
        >>> s = SupportSet.build(torch.eye(3), torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), cfg,
        ...                      ids=["a", "b", "c"])
        >>> s.ntotal, s.ids_of(torch.tensor([2, -1]))
        (3, ['c', None])
    """

    def __init__(self, index: SupportIndex, ids: list | None = None, texts: list | None = None):
        if not isinstance(index, SupportIndex):
            raise TypeError(f"index must be a SupportIndex, got {type(index).__name__}")
        for values, name in ((ids, "ids"), (texts, "texts")):
            if values is not None and len(values) != index.ntotal:
                raise ValueError(f"{name} must have one entry per support row ({index.ntotal}), got {len(values)}")
        self.index = index
        self.ids = None if ids is None else list(ids)
        self.texts = None if texts is None else list(texts)
        self._training_lists: list[torch.Tensor] | None = None

    @classmethod
    def build(
        cls,
        exemplars: torch.Tensor,
        labels: torch.Tensor,
        predictions: torch.Tensor,
        config: SDMConfig,
        device: torch.device | None = None,
        ids: list | None = None,
        texts: list | None = None,
    ) -> SupportSet:
        """The index ``config`` asks for (type, parameters, storage) over ``exemplars`` ``(N, M)`` with
        ``labels`` / ``predictions`` ``(N,)`` int64."""
        index = SupportIndex(
            exemplars,
            labels,
            predictions,
            device=device if device is not None else exemplars.device,
            index_type=config.index_type,
            index_params=config.index_params,
            storage=config.support_storage,
        )
        return cls(index, ids, texts)

    @classmethod
    def from_state(cls, state: SupportState, config: SDMConfig, device: torch.device | None = None) -> SupportSet:
        """Rebuild the index from stored exemplars (FAISS indexes are never serialised)."""
        return cls.build(state.vectors, state.labels, state.predictions, config, device, state.ids, state.texts)

    def to_state(self) -> SupportState:
        """The support set as plain CPU tensors; on the CPU ``vectors`` is a view of the index's storage
        (valid until the set changes)."""
        return SupportState(
            vectors=self.index.stored_vectors().detach().cpu().contiguous(),
            labels=self.labels.clone(),
            predictions=self.predictions.clone(),
            ids=None if self.ids is None else list(self.ids),
            texts=None if self.texts is None else list(self.texts),
        )

    # -- what the index holds ---------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    @property
    def labels(self) -> torch.Tensor:
        """``(N,)`` int64 true labels (-1: known OOD row)."""
        return self.index.labels

    @property
    def predictions(self) -> torch.Tensor:
        """``(N,)`` int64 predictions of the head for the exemplars."""
        return self.index.predictions

    @property
    def vectors(self) -> torch.Tensor:
        """``(N, M)`` exemplars in the storage dtype."""
        return self.index.vectors

    @property
    def device(self) -> torch.device:
        return self.index.device

    @property
    def backend(self) -> str:
        return self.index.backend

    @property
    def index_type(self) -> str:
        return self.index.index_type

    @property
    def index_params(self) -> dict:
        return self.index.index_params

    @property
    def storage(self) -> str:
        return self.index.storage

    @property
    def exact(self) -> bool:
        return self.index.exact

    @property
    def owns_vectors(self) -> bool:
        return self.index.owns_vectors

    def stored_vectors(self) -> torch.Tensor:
        """The exemplars without a copy where possible, valid only until the set changes (:attr:`vectors` copies)."""
        return self.index.stored_vectors()

    def set_search_width(self, width: int) -> None:
        """Set ``nprobe`` (IVF) or ``efSearch`` (HNSW) of the live index (not saved)."""
        self.index.set_search_width(width)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.index.search(queries, k)

    def pair_distances(self, queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.index.pair_distances(queries, rows)

    def ids_of(self, rows: torch.Tensor) -> list | None:
        """The stored ids of support ``rows`` (None for -1), or None when no ids are stored."""
        if self.ids is None:
            return None
        return [self.ids[i] if i >= 0 else None for i in rows.tolist()]

    # -- changes ----------------------------------------------------------------------------
    def to(self, device: torch.device) -> SupportSet:
        self.index.to(device)
        return self

    def add(
        self,
        exemplars: torch.Tensor,
        labels: torch.Tensor,
        predictions: torch.Tensor,
        ids: list | None = None,
        texts: list | None = None,
    ) -> None:
        """Append rows ``exemplars (K, M)``, ``labels`` / ``predictions (K,)``; existing row numbers stay.

        Raises:
            ValueError: ``ids`` / ``texts`` given when the set stores none (or missing when it does), or not K long.
        """
        for values, name, stored in ((ids, "ids", self.ids), (texts, "texts", self.texts)):
            if (values is None) != (stored is None):
                raise ValueError(
                    f"the support set {'stores' if stored is not None else 'has no'} {name}; "
                    f"pass {name} {'for every new point' if stored is not None else 'only if it had them'}"
                )
            if values is not None and len(values) != exemplars.shape[0]:
                raise ValueError(f"{name} must have one entry per new point ({exemplars.shape[0]}), got {len(values)}")
        self.index.add(exemplars, labels, predictions)
        if ids is not None and self.ids is not None:
            self.ids = self.ids + list(ids)
        if texts is not None and self.texts is not None:
            self.texts = self.texts + list(texts)
        self._training_lists = None

    def exact_copy(self) -> SupportSet:
        """The same exemplars behind an exact float32 flat index (the reference for approximate ones)."""
        index = SupportIndex(self.index.vectors.float(), self.labels, self.predictions, device=self.device)
        return SupportSet(index, self.ids, self.texts)

    # -- similarity -------------------------------------------------------------------------
    def similarity(
        self,
        exemplars: torch.Tensor,
        prediction: torch.Tensor,
        config: SDMConfig,
        self_index: torch.Tensor | None = None,
    ) -> SimilarityResult:
        """``q``, nearest row and ``d_nearest`` of query ``exemplars (B, M)`` predicted ``prediction (B,)``;
        ``self_index (B,)``: each row's own support row, excluded from its search (-1: none)."""
        return compute_similarity(
            self,
            exemplars,
            prediction,
            self.labels,
            self.predictions,
            self_index=self_index,
            max_q=config.max_q,
            initial_k=config.initial_k,
        )

    def training_distance_lists(self, config: SDMConfig, recompute: bool = False) -> list[torch.Tensor]:
        """C sorted class-wise distance lists of the support points, own row excluded (a support point's
        ``d`` during training); cached until the set changes."""
        if self._training_lists is None or recompute:
            rows = torch.arange(self.ntotal)
            sim = self.similarity(self.index.vectors, self.predictions, config, self_index=rows)
            self._training_lists = class_distance_lists(sim.d_nearest, self.labels, sim.q, config.num_classes)
        return self._training_lists

    @property
    def has_training_lists(self) -> bool:
        return self._training_lists is not None
