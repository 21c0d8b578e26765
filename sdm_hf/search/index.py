"""The support set (exemplars with true and predicted labels) behind FAISS; the one place that picks the backend.

* CPU: ``faiss.index_factory``'s ``Flat`` (exact), or IVF / HNSW (approximate; on the CPU even for a CUDA head).
* CUDA with a FAISS GPU build: ``GpuIndexFlatL2``, sharded in contiguous row ranges over several GPUs when a float32
  support exceeds half the device's free memory.
* CUDA without one: exact torch search (chunked matrix product + ``topk``).

Results are CPU tensors, each row ordered by (squared L2 distance, row index). On the CPU the FAISS index holds the
only copy of the exemplars. The index is never serialised: rebuild it with ``SupportIndex(vectors, labels, ...)``.
"""

from __future__ import annotations

import math
import os
from typing import Any

try:
    import faiss
except ModuleNotFoundError as error:  # the FAISS build is the user's choice at install time (README, "Install")
    if error.name != "faiss":
        raise
    raise ImportError(
        "sdm_hf needs FAISS and no `faiss` module is installed: `pip install faiss-cpu` (what "
        "`pip install sdm-hf` brings), or on NVIDIA GPUs one of the official GPU builds instead of "
        "faiss-cpu: `pip install faiss-gpu-cu12` (CUDA 12) or `pip install faiss-gpu-cu11` (CUDA 11)"
    ) from error
import numpy as np
import torch

from . import exhaustive
from .exhaustive import add_chunked, as_float32, blocked_float16_search, build_shards, order_rows, rows_within

__all__ = [
    "SupportIndex",
    "resolve_device",
    "faiss_gpu_available",
    "gpu_shard_count",
    "index_parameters",
    "INDEX_TYPES",
]

# FAISS's GPU k-selection supports at most this many neighbours per query.
_FAISS_GPU_MAX_K = 2048
# Bytes of distance matrix the torch fallback materialises per chunk of queries.
_TORCH_CHUNK_BYTES = 256 * 1024 * 1024
# Float16 flat search: from this many queries, blocked float32 matrix products (a fixed cost per call) beat
# FAISS's float16 scan (a cost per query); smaller batches use the scan.
_BLOCKED_MIN_QUERIES = 64
# Exact GPU search is sharded over several GPUs when the support takes more than this fraction
# of the target device's free memory (the rest is left to queries, distances and the model).
_GPU_SHARE = 0.5


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> CPU; ``"cuda"`` -> the current CUDA device; an integer ``i`` -> ``cuda:i``;
    otherwise ``torch.device``.

    Raises:
        TypeError: ``device`` is not a string, integer, torch.device or None.
        ValueError: CUDA was asked for but is not available, or ``device`` names no device.
    """
    if device is None:
        return torch.device("cpu")
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"device must be a string like 'cpu' or 'cuda:0', an integer or a torch.device, got {device!r}")
    if isinstance(device, int):
        device = f"cuda:{device}"
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"device {device!r} is not a device torch knows ({err}); use 'cpu' or 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                "device='cuda' was requested but torch.cuda.is_available() is False; "
                "pass device='cpu' or install a CUDA build of torch"
            )
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def faiss_gpu_available() -> bool:
    """True when the installed FAISS is a GPU build and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def gpu_shard_count(nbytes: int, device: torch.device) -> int:
    """GPUs an exact float32 support of ``nbytes`` is sharded over on ``device``: 1 on the CPU, with one GPU, in a
    multi-process run, or when it fits in half the device's free memory; else enough for half of the least free
    GPU each, at most all FAISS sees."""
    if device.type != "cuda" or not faiss_gpu_available() or _several_processes():
        return 1  # with several processes each owns its GPU: shards would land on the others'
    gpus = int(faiss.get_num_gpus())
    free, _ = torch.cuda.mem_get_info(device)
    if gpus <= 1 or nbytes <= max(_GPU_SHARE * float(free), 1.0):
        return 1
    # every GPU that takes a shard must have the room: the least free one sets the share
    least = min(float(torch.cuda.mem_get_info(torch.device("cuda", g))[0]) for g in range(gpus))
    return min(gpus, math.ceil(nbytes / max(_GPU_SHARE * least, 1.0)))


def _several_processes() -> bool:
    """Whether this process is one of several of a run (torchrun / accelerate launch)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1") or "1") > 1


INDEX_TYPES = ("flat", "ivf", "hnsw")
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "ivf": {"nlist": None, "nprobe": 16},
    "hnsw": {"M": 32, "efConstruction": 200, "efSearch": 128},
}
# Upper bounds: HNSW keeps 2*M links per vector (a few hundred exhausts memory: FAISS aborts with
# std::bad_alloc); larger ef and IVF sizes only cost time.
_MAXIMA = {"M": 256, "efConstruction": 1 << 16, "efSearch": 1 << 16, "nlist": 1 << 20, "nprobe": 1 << 20}


def index_parameters(index_type: str, params: dict | None, ntotal: int) -> dict:
    """Validated parameters of an index type, defaults filled in (``nlist`` defaults to about ``4 sqrt(N)``).

    Raises:
        ValueError: unknown ``index_type`` or parameter, or a value that is not an integer in its allowed range.
    """
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}")
    defaults: dict[str, Any] = dict(_DEFAULT_PARAMS.get(index_type, {}))
    unknown = sorted(set(params or {}) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {index_type} index parameter(s) {unknown}; valid: {sorted(defaults)}")
    values = {**defaults, **(params or {})}
    if index_type == "ivf" and values["nlist"] is None:
        values["nlist"] = max(1, min(int(4 * math.sqrt(max(ntotal, 1))), max(ntotal // 39, 1)))
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= _MAXIMA[key]:
            raise ValueError(
                f"{index_type} index parameter {key} must be an integer in 1..{_MAXIMA[key]}, got {value!r}"
            )
    return values


class SupportIndex:
    """Exemplar vectors + true labels + predicted labels, searchable by L2.

    Args:
        vectors: ``[N, M]`` float exemplars.
        labels: ``[N]`` int true labels.
        predictions: ``[N]`` int predicted labels under the head's current weights.
        device: where the search runs (default: ``vectors``' device).
        index_type: ``"flat"`` (exact), ``"ivf"`` (params ``nlist``, ``nprobe``) or ``"hnsw"`` (``M``,
            ``efConstruction``, ``efSearch``); approximate ones search on the CPU (check them with
            ``SDMHead.index_agreement``).
        index_params: parameters of the index type.
        storage: ``"float32"`` or ``"float16"`` (half the memory; distances carry fp16 rounding).

    Raises:
        ValueError: unknown ``storage``, invalid index parameters, unequal row counts, ``vectors`` not 2-D, or an
            unavailable ``device``.
        TypeError: ``device`` of an unsupported type.

    Example:
        >>> import torch
        >>> index = SupportIndex(torch.eye(3), torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
        >>> distances, rows = index.search(torch.eye(3)[:1], k=2)
        >>> rows.tolist(), distances.tolist()
        ([[0, 1]], [[0.0, 2.0]])
    """

    def __init__(
        self,
        vectors: torch.Tensor,
        labels: torch.Tensor,
        predictions: torch.Tensor,
        device: str | torch.device | None = None,
        index_type: str = "flat",
        index_params: dict | None = None,
        storage: str = "float32",
    ):
        if storage not in STORAGE_DTYPES:
            raise ValueError(f"storage must be one of {sorted(STORAGE_DTYPES)}, got {storage!r}")
        self.device = resolve_device(device) if device is not None else vectors.device
        self.storage = storage
        self.index_type = index_type
        self._shards = self._shard_count(vectors.shape[0] * (vectors.shape[1] if vectors.dim() == 2 else 1))
        # our own copy of the exemplars (on the host when sharded over GPUs); dropped when they
        # can be read in place inside FAISS
        self._own: torch.Tensor | None = vectors.detach().to(self._home, STORAGE_DTYPES[storage]).contiguous()
        self.labels = labels.detach().long().cpu()
        self.predictions = predictions.detach().long().cpu()
        if not (self._own.shape[0] == self.labels.numel() == self.predictions.numel()):
            raise ValueError(
                "vectors, labels and predictions must have the same number of rows; got "
                f"{self._own.shape[0]}, {self.labels.numel()}, {self.predictions.numel()}"
            )
        if self._own.dim() != 2:
            raise ValueError(f"vectors must be [N, M], got shape {tuple(self._own.shape)}")
        self._dim = int(self._own.shape[1])
        self.index_params = index_parameters(index_type, index_params, self._own.shape[0])
        # a FAISS index (its SWIG stubs type each index class separately, so kept as Any)
        self._faiss: Any = None
        self._build()

    def __deepcopy__(self, memo) -> SupportIndex:
        # Rebuild from the stored arrays: the FAISS object itself is never serialised (its
        # Python wrapper would do so to copy it).
        return SupportIndex(
            self._own.clone() if self._own is not None else self.vectors,
            self.labels.clone(),
            self.predictions.clone(),
            self.device,
            self.index_type,
            dict(self.index_params),
            self.storage,
        )

    def __getstate__(self):
        raise TypeError(
            "SupportIndex is not picklable by design (a FAISS index is never serialised); store "
            "its vectors, labels and predictions in safetensors and rebuild it with SupportIndex(...)"
        )

    @property
    def vectors(self) -> torch.Tensor:
        """``[N, M]`` exemplars in the storage dtype (a copy when they live inside FAISS)."""
        stored = self.stored_vectors()
        return stored if self._own is not None or self.index_type == "ivf" else stored.clone()

    def stored_vectors(self) -> torch.Tensor:
        """``[N, M]`` exemplars in the storage dtype, a view into FAISS where possible (IVF: a decoded copy).

        The view is valid only until :meth:`add` or :meth:`to`: use it at once; :attr:`vectors` is the safe copy."""
        if self._own is not None:
            return self._own
        index: Any = self._faiss
        n = int(index.ntotal)
        if self.index_type == "ivf":
            return self._rows(torch.arange(n))
        if self.index_type == "hnsw":  # HNSW keeps the vectors in a flat storage index, in row order
            index = faiss.downcast_index(index.storage)
        if n == 0:
            return torch.zeros((0, self._dim), dtype=STORAGE_DTYPES[self.storage])
        if self.storage == "float32":
            array = faiss.rev_swig_ptr(index.get_xb(), n * self._dim).reshape(n, self._dim)
        else:
            raw = faiss.rev_swig_ptr(index.codes.data(), n * index.code_size)
            array = raw.view(np.float16).reshape(n, self._dim)
        return torch.from_numpy(array)

    def set_search_width(self, width: int) -> None:
        """Set an approximate index's search width without rebuilding: IVF ``nprobe`` (capped at ``nlist``), HNSW
        ``efSearch``. Wider is slower and closer to exact.

        Raises:
            ValueError: ``width < 1``, or a ``"flat"`` index.
        """
        width = int(width)
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if self.index_type == "ivf":
            self.index_params["nprobe"] = width
            if self._faiss is not None:
                self._faiss.nprobe = min(width, int(self._faiss.nlist))
        elif self.index_type == "hnsw":
            self.index_params["efSearch"] = width
        else:
            raise ValueError("set_search_width applies to approximate indexes ('ivf' or 'hnsw'), not 'flat'")

    @property
    def owns_vectors(self) -> bool:
        """True when the index keeps its own exemplar tensor; False when they are read in place inside FAISS."""
        return self._own is not None

    @property
    def exact(self) -> bool:
        """True for exact float32 search (the default)."""
        return self.index_type == "flat" and self.storage == "float32"

    @property
    def gpu_shards(self) -> int:
        """How many GPUs the exact search is spread over (1 unless the support needs more)."""
        return self._shards

    @property
    def shard_sizes(self) -> list[int]:
        """Rows held by each GPU shard, in row order (``[ntotal]`` when not sharded)."""
        if self._shards == 1:
            return [self.ntotal]
        return [int(self._faiss.at(j).ntotal) for j in range(self._shards)]

    @property
    def _home(self) -> torch.device:
        """Where our own copy of the exemplars lives: the host when sharded over GPUs."""
        return torch.device("cpu") if self._shards > 1 else self.device

    def _shard_count(self, values: int) -> int:
        exact_gpu = self.device.type == "cuda" and self.exact
        return gpu_shard_count(4 * int(values), self.device) if exact_gpu else 1

    def _gpu_flat(self, gpu: int) -> Any:
        """An empty exact ``GpuIndexFlatL2`` on GPU ``gpu`` (its resources kept alive here)."""
        resources = faiss.StandardGpuResources()
        self._gpu_resources.append(resources)
        config = faiss.GpuIndexFlatConfig()
        config.device = int(gpu)
        return faiss.GpuIndexFlatL2(resources, self._dim, config)

    # -- construction ---------------------------------------------------------------------
    def _cpu_index(self, dim: int) -> Any:
        """An empty CPU index from ``faiss.index_factory`` (``Flat`` / ``IVF<nlist>`` / ``HNSW<M>``, each
        ``Flat`` or ``SQfp16`` storage), with this index's search parameters set."""
        params = self.index_params
        codes = "SQfp16" if self.storage == "float16" else "Flat"
        if self.index_type == "flat":
            return faiss.index_factory(dim, codes, faiss.METRIC_L2)
        if self.index_type == "ivf":
            nlist = min(params["nlist"], max(self.ntotal, 1))
            index: Any = faiss.index_factory(dim, f"IVF{nlist},{codes}", faiss.METRIC_L2)
            # float16 codes of the vectors themselves, not of residuals to the centroid, so rows decode back to
            # exactly the stored float16 values
            if self.storage == "float16":
                index.by_residual = False
            index.nprobe = min(params["nprobe"], nlist)
            return index
        hnsw: Any = faiss.index_factory(dim, f"HNSW{params['M']},{codes}", faiss.METRIC_L2)
        hnsw.hnsw.efConstruction = params["efConstruction"]
        return hnsw

    def _build(self) -> None:
        """(Re)build the FAISS index (or none, for torch search) from the exemplars held in ``_own``."""
        dim = self._dim
        self._gpu_resources: list[Any] = []
        own = self.stored_vectors()  # _build runs while the index still owns its vectors
        if self._shards > 1:  # contiguous row ranges over the GPUs; the host keeps the exemplars
            first = int(self.device.index or 0)
            gpus = [(first + j) % int(faiss.get_num_gpus()) for j in range(self._shards)]
            self._faiss = build_shards(own, self._shards, lambda j: self._gpu_flat(gpus[j]))
            return
        if self.device.type == "cuda" and self.exact and faiss_gpu_available():
            self._faiss = self._gpu_flat(int(self.device.index or 0))
        elif self.device.type == "cuda" and self.exact:
            self._faiss = None  # torch exact search on the device
        else:
            self._faiss = self._cpu_index(dim)
        if self._faiss is not None and own.shape[0] > 0:
            if not self._faiss.is_trained:  # IVF: k-means on a seeded subsample
                n = own.shape[0]
                take = min(n, 256 * self.index_params.get("nlist", 1))
                rows = np.sort(np.random.default_rng(0).permutation(n)[:take])
                self._faiss.train(as_float32(own[torch.from_numpy(rows)]))
            self._add_chunked(own)
        if self._faiss is not None and self.index_type == "ivf":
            self._faiss.make_direct_map()  # row -> (list, offset), so rows can be decoded back
        if self._faiss is not None and self.device.type == "cpu":
            # FAISS holds exactly these values (IVF through the direct map): no second copy
            self._own = None

    def _rows(self, rows: torch.Tensor) -> torch.Tensor:
        """``[len(rows), M]`` exemplars of ``rows`` in the storage dtype, on the device of the stored copy."""
        rows = rows.long()
        if self._own is None and self.index_type == "ivf":
            out = torch.empty((rows.numel(), self._dim), dtype=STORAGE_DTYPES[self.storage])
            step = rows_within(exhaustive.STAGING_BYTES, self._dim)
            for start in range(0, rows.numel(), step):  # bounded float32 staging
                chunk = np.ascontiguousarray(rows[start : start + step].cpu().numpy(), dtype=np.int64)
                out[start : start + step] = torch.from_numpy(self._faiss.reconstruct_batch(chunk))
            return out
        stored = self.stored_vectors()
        return stored[rows.to(stored.device)]

    def _add_chunked(self, vectors: torch.Tensor) -> None:
        """Add to FAISS in bounded chunks; a sharded index grows its last shard, so row indices stay."""
        if self._shards > 1:
            add_chunked(self._faiss.at(self._faiss.count() - 1), vectors)
            self._faiss.syncWithSubIndexes()
        else:
            add_chunked(self._faiss, vectors)

    @property
    def ntotal(self) -> int:
        """Number of support rows ``N``."""
        return int(self._own.shape[0]) if self._own is not None else int(self._faiss.ntotal)

    @property
    def dim(self) -> int:
        """Exemplar width ``M``."""
        return self._dim

    @property
    def backend(self) -> str:
        """``"faiss-cpu"``, ``"faiss-gpu"`` or ``"torch"``."""
        if self._faiss is None:
            return "torch"
        return "faiss-gpu" if self._gpu_resources else "faiss-cpu"

    def to(self, device: str | torch.device) -> SupportIndex:
        """Move the support set (and rebuild the index) on ``device``; returns self."""
        device = resolve_device(device)
        if device != self.device:
            stored = self.stored_vectors()
            self.device = device
            self._shards = self._shard_count(stored.numel())
            self._own = stored.to(self._home).contiguous()
            self._build()
        return self

    def add(self, vectors: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor) -> None:
        """Append ``[n, M]`` ``vectors`` with ``[n]`` int ``labels`` and ``predictions``, without retraining
        (``SDMHead.add_to_support``); existing row indices do not change.

        Raises:
            ValueError: ``vectors`` is not ``[n, M]``.
        """
        vectors = vectors.detach().to(self._home, STORAGE_DTYPES[self.storage])
        if vectors.dim() != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected [n, {self.dim}] vectors, got {tuple(vectors.shape)}")
        if self._own is not None:
            self._own = torch.cat([self._own, vectors]).contiguous()
        self.labels = torch.cat([self.labels, labels.detach().long().cpu()])
        self.predictions = torch.cat([self.predictions, predictions.detach().long().cpu()])
        if self._faiss is not None:
            self._add_chunked(vectors)

    # -- search ---------------------------------------------------------------------------
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k nearest support rows (exact for ``"flat"``, approximate for ``"ivf"`` / ``"hnsw"``).

        Args:
            queries: ``[B, M]`` float vectors.
            k: neighbours per query, ``1 <= k <= ntotal``.

        Returns:
            ``(distances [B, k] float32, rows [B, k] int64)`` on the CPU: squared L2, ordered by (distance, row).

        Raises:
            ValueError: ``k`` outside ``[1, ntotal]``.
        """
        k = int(k)
        if not 1 <= k <= self.ntotal:
            raise ValueError(f"k must be in [1, {self.ntotal}] (the support size), got {k}")
        if queries.shape[0] == 0:
            return torch.zeros((0, k)), torch.zeros((0, k), dtype=torch.long)
        use_torch = self._faiss is None or (self.backend == "faiss-gpu" and k > _FAISS_GPU_MAX_K)
        if use_torch:
            distances, rows = self._torch_search(queries, k)
        elif self.index_type == "flat" and self.storage == "float16" and queries.shape[0] >= _BLOCKED_MIN_QUERIES:
            distances, rows = blocked_float16_search(self.stored_vectors(), queries.to(self.device), k)
        else:
            if self.index_type == "hnsw":  # HNSW needs a search beam at least k wide
                self._faiss.hnsw.efSearch = max(self.index_params["efSearch"], k)
            d, i = self._faiss.search(as_float32(queries), k)
            distances, rows = torch.from_numpy(d), torch.from_numpy(i).long()
        return order_rows(distances.cpu(), rows.cpu())

    def _torch_search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact search by chunked matrix products and ``topk`` on the exemplars' device."""
        vectors = self.stored_vectors().float()
        queries = queries.detach().to(vectors.device, torch.float32)  # the host when sharded over GPUs
        support_norms = (vectors * vectors).sum(dim=1)
        chunk = rows_within(_TORCH_CHUNK_BYTES, self.ntotal)
        out_d, out_i = [], []
        for start in range(0, queries.shape[0], chunk):  # chunks bound memory
            block = queries[start : start + chunk]
            dist = (block * block).sum(1, keepdim=True) + support_norms - 2.0 * block @ vectors.T
            d, i = torch.topk(dist.clamp(min=0), k, dim=1, largest=False, sorted=True)
            out_d.append(d.cpu())
            out_i.append(i.cpu())
        return torch.cat(out_d), torch.cat(out_i)

    def pair_distances(self, queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Exact ``|queries[i] - vectors[rows[i]]|^2`` for ``[B, M]`` queries and ``[B]`` rows: ``[B]`` float32, CPU."""
        queries = queries.detach().to(self.device, torch.float32)
        diff = queries - self._rows(rows).to(self.device).float()
        return (diff * diff).sum(dim=1).float().cpu()
