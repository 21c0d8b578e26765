import copy
import pickle

import pytest
import torch

from sdm_hf import SDMConfig
from sdm_hf.search.index import SupportIndex, resolve_device


def test_search_orders_ties_by_row_index():
    vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [3.0, 3.0]])
    index = SupportIndex(vectors, torch.zeros(5), torch.zeros(5))
    distances, rows = index.search(torch.zeros(1, 2), 5)
    assert rows.tolist() == [[0, 1, 2, 3, 4]]
    assert distances[0, :4].tolist() == [1.0, 1.0, 1.0, 1.0]


def test_add_and_bad_k():
    index = SupportIndex(torch.eye(3), torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1]))
    index.add(torch.tensor([[5.0, 5.0, 5.0]]), torch.tensor([0]), torch.tensor([1]))
    assert index.ntotal == 4 and index.predictions.tolist() == [0, 1, 1, 1]
    assert index.search(torch.tensor([[5.0, 5.0, 5.0]]), 1)[1].tolist() == [[3]]
    with pytest.raises(ValueError, match="k must be"):
        index.search(torch.zeros(1, 3), 5)
    with pytest.raises(ValueError, match="vectors"):
        index.add(torch.zeros(1, 2), torch.tensor([0]), torch.tensor([0]))


def test_torch_backend_matches_faiss():
    g = torch.Generator().manual_seed(0)
    support = torch.randn(500, 16, generator=g)
    queries = torch.randn(40, 16, generator=g)
    index = SupportIndex(support, torch.zeros(500), torch.zeros(500))
    d_faiss, i_faiss = index.search(queries, 10)
    d_torch, i_torch = index._torch_search(queries, 10)
    assert torch.equal(i_faiss, i_torch)
    torch.testing.assert_close(d_faiss, d_torch, rtol=1e-4, atol=1e-4)


def test_copy_rebuilds_and_pickle_is_refused():
    index = SupportIndex(torch.eye(3), torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1]))
    clone = copy.deepcopy(index)
    assert clone._faiss is not index._faiss and clone.search(torch.eye(3), 1)[1].tolist() == [[0], [1], [2]]
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(index)


def test_resolve_device():
    assert resolve_device(None) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            resolve_device("cuda")


def _clustered(n=3000, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(10, dim, generator=g) * 3
    cluster = torch.randint(0, 10, (n,), generator=g)
    return centers[cluster] + torch.randn(n, dim, generator=g), cluster % 2


@pytest.mark.parametrize("index_type, params", [("ivf", {"nlist": 16, "nprobe": 8}), ("hnsw", {"M": 16})])
@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_approximate_indexes_find_the_exact_neighbours(index_type, params, storage):
    x, y = _clustered()
    exact = SupportIndex(x[:2500], y[:2500], y[:2500])
    approx = SupportIndex(x[:2500], y[:2500], y[:2500], index_type=index_type, index_params=params, storage=storage)
    assert approx.vectors.dtype == (torch.float16 if storage == "float16" else torch.float32)
    _, rows_exact = exact.search(x[2500:], 5)
    d, rows = approx.search(x[2500:], 5)
    recall = (rows[:, :1] == rows_exact[:, :1]).float().mean()
    assert recall > 0.95
    assert bool((d[:, 1:] >= d[:, :-1]).all())  # still ordered by distance


def test_index_parameters_are_checked():
    from sdm_hf.search.index import index_parameters

    assert index_parameters("ivf", None, 10_000)["nlist"] == 256  # min(4 sqrt(N), N / 39)
    with pytest.raises(ValueError, match="unknown ivf index parameter"):
        index_parameters("ivf", {"nprobes": 3}, 100)
    with pytest.raises(ValueError, match="index_type"):
        index_parameters("lsh", None, 100)
    with pytest.raises(ValueError, match=r"M must be an integer in 1\.\.256, got 0"):
        index_parameters("hnsw", {"M": 0}, 100)
    with pytest.raises(ValueError, match=r"M must be an integer in 1\.\.256, got 1000000"):  # not std::bad_alloc
        SDMConfig(input_dim=4, index_type="hnsw", index_params={"M": 10**6})


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivf"])
@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_exemplars_are_read_in_place_and_copies_stay_valid(storage, index_type, monkeypatch):
    import sdm_hf.search.exhaustive
    import sdm_hf.search.index

    monkeypatch.setattr(sdm_hf.search.exhaustive, "STAGING_BYTES", 4 * 8 * 7)  # FAISS gets 7 rows at a time
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g)
    index = SupportIndex(x, torch.zeros(50), torch.zeros(50), storage=storage, index_type=index_type)
    assert not index.owns_vectors  # no second copy beside FAISS's
    dtype = torch.float16 if storage == "float16" else torch.float32
    torch.testing.assert_close(index.vectors, x.to(dtype))
    before = index.vectors
    index.add(torch.ones(3, 8), torch.zeros(3), torch.zeros(3))  # may move FAISS's storage
    assert index.ntotal == 53 and torch.equal(index.vectors[50:], torch.ones(3, 8, dtype=dtype))
    torch.testing.assert_close(before, x.to(dtype))  # the copy handed out earlier is still valid
    torch.testing.assert_close(index.pair_distances(torch.ones(1, 8), torch.tensor([52])), torch.zeros(1))
    rows = torch.tensor([3, 51, 0, 3])  # any order, repeats (IVF decodes them through its direct map)
    expected = ((x[0] - index.vectors[rows].float()) ** 2).sum(1)
    torch.testing.assert_close(index.pair_distances(x[:1].expand(4, 8), rows), expected)
    copied = copy.deepcopy(index)
    assert torch.equal(copied.vectors, index.vectors) and torch.equal(
        copied.search(x[:4], 3)[1], index.search(x[:4], 3)[1]
    )


def test_float16_flat_search_uses_blocks_and_matches_faiss(monkeypatch):
    import faiss
    import numpy as np

    import sdm_hf.search.exhaustive
    import sdm_hf.search.index

    x, y = _clustered(n=700, dim=12, seed=3)
    x = torch.cat([x, x[:5]])  # exact duplicates: ties must resolve by row
    index = SupportIndex(x, torch.zeros(len(x)), torch.zeros(len(x)), storage="float16")
    monkeypatch.setattr(sdm_hf.search.exhaustive, "STAGING_BYTES", 4 * 12 * 50)  # 50-row blocks
    queries = torch.cat([x[:5], torch.randn(40, 12)])
    _, scanned = index.search(queries, 9)  # fewer than _BLOCKED_MIN_QUERIES: FAISS's scan
    monkeypatch.setattr(sdm_hf.search.index, "_BLOCKED_MIN_QUERIES", 1)
    d, rows = index.search(queries, 9)
    assert torch.equal(rows, scanned)
    reference = faiss.IndexFlatL2(12)
    reference.add(np.ascontiguousarray(index.vectors.float().numpy()))
    d_ref, rows_ref = reference.search(np.ascontiguousarray(queries.numpy()), 9)
    assert torch.equal(rows[5:], torch.from_numpy(rows_ref[5:]).long())
    torch.testing.assert_close(d, torch.from_numpy(d_ref), atol=1e-3, rtol=1e-4)
    assert rows[:5, :2].tolist() == [[i, 700 + i] for i in range(5)]  # a point and its duplicate, lower row first
    assert torch.equal(d[:5, 0], d[:5, 1]) and bool((d[:5, 0] < 1e-4).all())  # float16 rounding only


def test_gpu_shard_count_spreads_only_what_does_not_fit(monkeypatch):
    import faiss

    import sdm_hf.search.index
    from sdm_hf.search.index import gpu_shard_count

    cuda = torch.device("cuda", 0)
    assert gpu_shard_count(10**12, torch.device("cpu")) == 1
    monkeypatch.setattr(sdm_hf.search.index, "faiss_gpu_available", lambda: True)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 4)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 10**9, 80 * 10**9))
    assert gpu_shard_count(4 * 10**9, cuda) == 1  # within half of the free 10 GB
    assert gpu_shard_count(12 * 10**9, cuda) == 3  # 5 GB per GPU
    assert gpu_shard_count(10**12, cuda) == 4  # all there are
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert gpu_shard_count(10**12, cuda) == 1  # one of several processes: each owns its GPU
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    assert gpu_shard_count(10**12, cuda) == 1


def test_sharded_exact_index_returns_support_rows_and_grows_its_last_shard(monkeypatch):
    """The multi-GPU layout (contiguous row ranges in faiss.IndexShards), with CPU flat
    indexes standing in for GpuIndexFlatL2: same neighbours as one index, rows added later
    keep the numbering."""
    import faiss

    x, _ = _clustered(n=301, dim=8, seed=5)
    plain = SupportIndex(x, torch.zeros(301), torch.zeros(301))

    def cpu_shard(self, gpu):
        self._gpu_resources.append(gpu)
        return faiss.IndexFlatL2(self.dim)

    monkeypatch.setattr(SupportIndex, "_shard_count", lambda self, values: 3)
    monkeypatch.setattr(SupportIndex, "_gpu_flat", cpu_shard)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 3)
    sharded = SupportIndex(x, torch.zeros(301), torch.zeros(301))
    assert sharded.gpu_shards == 3 and sharded.backend == "faiss-gpu" and sharded.owns_vectors
    assert sharded.shard_sizes == [100, 101, 100] and plain.shard_sizes == [301]
    queries = torch.cat([x[[0, 150, 300]], torch.randn(20, 8)])
    d, rows = sharded.search(queries, 7)
    d_ref, rows_ref = plain.search(queries, 7)
    assert torch.equal(rows, rows_ref) and rows[:3, 0].tolist() == [0, 150, 300]
    torch.testing.assert_close(d, d_ref)
    extra = torch.full((2, 8), 50.0)
    sharded.add(extra, torch.ones(2), torch.ones(2))
    assert sharded.ntotal == 303 and sharded.shard_sizes == [100, 101, 102]
    assert sharded.search(extra[:1], 2)[1].tolist() == [[301, 302]]
    torch.testing.assert_close(sharded.pair_distances(extra[:1], torch.tensor([302])), torch.zeros(1))
