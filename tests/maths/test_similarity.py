import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdm_hf.maths.similarity import compute_similarity, similarity_from_neighbors
from sdm_hf.search.index import SupportIndex


def test_run_length_on_hand_built_lists():
    labels = torch.tensor([0, 0, 1, 1, 0])
    preds = torch.tensor([0, 0, 1, 0, 0])  # row 3 is mispredicted
    neighbors = torch.tensor(
        [
            [0, 1, 4, 2],  # query predicts 0: three matches, then a class-1 row
            [2, 0, 1, 4],  # query predicts 1: one match
            [3, 0, 1, 4],  # nearest is mispredicted: q = 0 (OOD)
            [0, 1, 4, 3],  # predicts 1: first neighbour has the other prediction
        ]
    )
    q, nearest, resolved = similarity_from_neighbors(neighbors, torch.tensor([0, 1, 0, 1]), labels, preds)
    assert q.tolist() == [3, 1, 0, 0]
    assert nearest.tolist() == [0, 2, 3, 0]
    assert resolved.tolist() == [True, True, True, True]


def test_self_match_not_ranked_first_is_skipped_by_identity():
    labels = torch.tensor([0, 0, 0, 1])
    preds = torch.tensor([0, 0, 0, 1])
    # the query is support row 2; an exact duplicate (row 1) is ranked before it
    neighbors = torch.tensor([[1, 2, 0, 3]])
    q, nearest, _ = similarity_from_neighbors(neighbors, torch.tensor([0]), labels, preds, torch.tensor([2]))
    assert q.tolist() == [2]  # rows 1 and 0 count, self (row 2) is neither counted nor a stop
    assert nearest.tolist() == [1]


def test_unresolved_and_cap():
    labels = preds = torch.zeros(5, dtype=torch.long)
    q, _, resolved = similarity_from_neighbors(torch.tensor([[0, 1, 2]]), torch.tensor([0]), labels, preds)
    assert q.tolist() == [3] and resolved.tolist() == [False]
    q, _, resolved = similarity_from_neighbors(torch.tensor([[0, 1, 2]]), torch.tensor([0]), labels, preds, max_q=2)
    assert q.tolist() == [2] and resolved.tolist() == [True]


def test_exact_duplicates_in_support():
    vectors = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [5.0, 5.0]])
    labels = torch.tensor([0, 0, 0, 1])
    index = SupportIndex(vectors, labels, labels)
    res = compute_similarity(index, vectors, labels, labels, labels, self_index=torch.arange(4))
    assert res.q.tolist() == [2, 2, 2, 0]
    assert res.d_nearest[:3].tolist() == [0.0, 0.0, 0.0]
    assert res.nearest_index[:3].tolist() == [1, 0, 0]  # ties by row index, self skipped


def _fixed(index, queries, pred, labels, preds, own, max_q):
    k = min(index.ntotal, max_q + (0 if own is None else 1))
    _, rows = index.search(queries, k)
    q, nearest, _ = similarity_from_neighbors(rows, pred, labels, preds, own, max_q)
    return q, nearest


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 400),
    dim=st.integers(1, 12),
    classes=st.integers(2, 4),
    accuracy=st.floats(0.5, 1.0),
    max_q=st.integers(1, 300),
    initial_k=st.integers(1, 40),
    self_search=st.booleans(),
    per_row=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_adaptive_widening_equals_fixed_search(n, dim, classes, accuracy, max_q, initial_k, self_search, per_row, seed):
    g = torch.Generator().manual_seed(seed)
    # few classes + mostly correct predictions give long runs, which exercise the widening
    support = torch.randn(n, dim, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g) * (torch.rand(n, generator=g) < 0.2)
    wrong = torch.rand(n, generator=g) > accuracy
    preds = torch.where(wrong, (labels + 1) % classes, labels)
    index = SupportIndex(support, labels, preds)
    if self_search:
        queries, qpred, own = support, preds, torch.arange(n)
    else:
        queries = torch.randn(50, dim, generator=g)
        qpred, own = torch.randint(0, classes, (50,), generator=g) * 0, None
    if per_row:  # per-row first widths, as fit_sdm_head uses from the previous epoch's q
        initial_k = torch.randint(1, 64, (queries.shape[0],), generator=g)
    res = compute_similarity(index, queries, qpred, labels, preds, own, max_q=max_q, initial_k=initial_k)
    q, nearest = _fixed(index, queries, qpred, labels, preds, own, max_q)
    assert torch.equal(res.q, q)
    assert torch.equal(res.nearest_index, nearest)
    assert int(res.q.max()) <= max_q
    expected = ((queries - support[nearest]) ** 2).sum(1)
    torch.testing.assert_close(res.d_nearest, expected)


def test_widening_cost_follows_run_length():
    g = torch.Generator().manual_seed(0)
    support = torch.randn(3000, 4, generator=g)
    labels = (support[:, 0] > 0).long()
    index = SupportIndex(support, labels, labels)
    queries = torch.randn(200, 4, generator=g)
    pred = (queries[:, 0] > 0).long()
    res = compute_similarity(index, queries, pred, labels, labels, max_q=2048, initial_k=8, growth=4)
    # rows whose run ended early were not widened: the search width tracks q
    short = res.q < 8
    assert bool((res.searched_k[short] == 8).all())
    assert bool((res.searched_k >= torch.clamp(res.q + 1, max=2048)).all())


@pytest.mark.parametrize("with_self", [False, True])
@pytest.mark.parametrize("max_q", [5, 2048])
def test_dense_pass_equals_the_adaptive_search(with_self, max_q):
    """q = the number of rows ordered (distance, row index) before the nearest failing row:
    the dense pass gives what the widened k-nearest search gives, duplicates (exact ties) included."""
    from sdm_hf.maths.similarity import dense_similarity
    from sdm_hf.search.index import SupportIndex

    g = torch.Generator().manual_seed(11)
    support = torch.randn(400, 6, generator=g)
    support[200:230] = support[:30]  # exact duplicates: ties resolved by row index
    labels = torch.randint(0, 3, (400,), generator=g)
    preds = torch.where(torch.rand(400, generator=g) < 0.9, labels, (labels + 1) % 3)
    if with_self:
        queries, own, qpred = support[:150], torch.arange(150), preds[:150]
    else:
        queries, own, qpred = torch.randn(150, 6, generator=g), None, torch.randint(0, 3, (150,), generator=g)
    index = SupportIndex(support, labels, preds)
    adaptive = compute_similarity(index, queries, qpred, labels, preds, self_index=own, max_q=max_q)
    dense = dense_similarity(queries, support, qpred, labels, preds, self_index=own, max_q=max_q, chunk_elements=4000)
    assert torch.equal(adaptive.q, dense.q)
    assert torch.equal(adaptive.nearest_index, dense.nearest_index)
    torch.testing.assert_close(adaptive.d_nearest, dense.d_nearest, rtol=1e-5, atol=1e-6)
    assert bool((dense.q > 0).any()) and bool((dense.q == 0).any())
