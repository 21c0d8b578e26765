import pytest
import torch

from sdm_hf import SDMConfig
from sdm_hf.head.support import SupportSet
from sdm_hf.search.index import SupportIndex


def _support(ids=None, texts=None, **config):
    cfg = SDMConfig(input_dim=4, exemplar_dim=3, **config)
    vectors = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 3]])
    labels, predictions = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1])
    return SupportSet.build(vectors, labels, predictions, cfg, ids=ids, texts=texts), cfg


def test_build_search_and_state_round_trip():
    support, cfg = _support(ids=["a", "b", "c", "d"])
    distances, rows = support.search(torch.tensor([[0.9, 0, 0]]), 2)
    assert rows.tolist() == [[1, 0]] and distances[0, 0].item() == pytest.approx(0.01)
    state = support.to_state()
    again = SupportSet.from_state(state, cfg)
    assert torch.equal(again.vectors, support.vectors) and again.ids == ["a", "b", "c", "d"]
    assert support.ids_of(torch.tensor([3, -1, 0])) == ["d", None, "a"]


def test_add_checks_ids_and_texts_and_drops_cached_lists():
    support, cfg = _support(ids=["a", "b", "c", "d"])
    lists = support.training_distance_lists(cfg)
    assert support.has_training_lists and len(lists) == 2
    with pytest.raises(ValueError, match="stores ids"):
        support.add(torch.zeros(1, 3), torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="has no texts"):
        support.add(torch.zeros(1, 3), torch.tensor([0]), torch.tensor([0]), ids=["e"], texts=["t"])
    support.add(torch.zeros(1, 3), torch.tensor([0]), torch.tensor([0]), ids=["e"])
    assert support.ntotal == 5 and support.ids[-1] == "e" and not support.has_training_lists


def test_similarity_counts_matching_neighbours_and_excludes_self():
    support, cfg = _support()
    # a query at row 0 predicted 0: row 0 (label 0, predicted 0) matches, then row 1 (predicted 1) stops q
    sim = support.similarity(torch.zeros(1, 3), torch.tensor([0]), cfg)
    assert sim.q.tolist() == [1] and sim.nearest_index.tolist() == [0]
    own = support.similarity(torch.zeros(1, 3), torch.tensor([0]), cfg, self_index=torch.tensor([0]))
    assert own.nearest_index.tolist() == [1] and own.q.tolist() == [0]


def test_exact_copy_is_flat_float32_over_the_same_rows():
    support, _ = _support(support_storage="float16")
    exact = support.exact_copy()
    assert exact.storage == "float32" and exact.exact and support.storage == "float16"
    assert torch.equal(exact.vectors, support.vectors.float())


def test_rejects_wrong_objects_and_lengths():
    with pytest.raises(TypeError, match="SupportIndex"):
        SupportSet(torch.zeros(2, 3))
    index = SupportIndex(torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one entry per support row"):
        SupportSet(index, ids=["only one"])
