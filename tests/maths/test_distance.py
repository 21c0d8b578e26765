import pytest
import torch

from sdm_hf.maths.distance import class_distance_lists, distance_quantile


def test_lists_skip_ood_and_sort():
    lists = class_distance_lists(
        torch.tensor([3.0, 1.0, 2.0, 9.0, 4.0]), torch.tensor([0, 0, 1, 1, 0]), torch.tensor([1, 2, 1, 0, 3]), 2
    )
    assert lists[0].tolist() == [1.0, 3.0, 4.0]
    assert lists[1].tolist() == [2.0]  # the q = 0 point (9.0) is left out


def test_boundaries():
    lists = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([2.0, 6.0])]
    d = distance_quantile(torch.tensor([1.0, 0.5, 4.0, 4.5, 2.0, 6.0]), lists)
    # equal to the smallest -> all of the list is >= it (ties in the query's favour)
    # below everything -> 1; equal to the largest -> 1/n; beyond the largest -> 0
    expected = [min(1.0, 1.0), 1.0, min(0.25, 0.5), 0.0, min(0.75, 1.0), 0.0]
    torch.testing.assert_close(d, torch.tensor(expected))


def test_empty_class_gives_zero():
    d = distance_quantile(torch.tensor([0.1, 5.0]), [torch.tensor([1.0, 2.0]), torch.tensor([])])
    assert d.tolist() == [0.0, 0.0]


def test_matches_definition_on_random_data():
    g = torch.Generator().manual_seed(0)
    values = torch.rand(500, generator=g).round(decimals=2)  # many ties
    labels = torch.randint(0, 3, (500,), generator=g)
    q = torch.randint(0, 3, (500,), generator=g)
    lists = class_distance_lists(values, labels, q, 3)
    queries = torch.rand(200, generator=g).round(decimals=2)
    d = distance_quantile(queries, lists)
    for i, v in enumerate(queries.tolist()):
        per_class = []
        for c in range(3):
            ref = values[(labels == c) & (q > 0)]
            per_class.append(1 - float((ref < v).sum()) / ref.numel())
        assert abs(float(d[i]) - min(per_class)) < 1e-6


def test_a_query_within_float_noise_of_a_reference_value_ties_with_it():
    """The same text embedded in another batch differs in its last bits; its d must not jump."""
    from sdm_hf.maths.distance import TIE_TOLERANCE

    reference = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.5, 2.5, 6.0])]
    exact = torch.tensor([2.0, 2.5, 7.0, 0.0])
    for factor in (1 + 1e-7, 1 + TIE_TOLERANCE / 2, 1 - 1e-7):
        assert torch.equal(distance_quantile(exact * factor, reference), distance_quantile(exact, reference))
    moved = distance_quantile(exact * (1 + 10 * TIE_TOLERANCE), reference)  # beyond the tolerance: not a tie
    assert moved[0] < distance_quantile(exact, reference)[0]
    # every reference value is its own nearest: the calibration points' own d are unchanged
    lists = [torch.tensor([1.0, 1.0 + 1e-6, 1.0 + 2e-6])]
    assert distance_quantile(lists[0], lists).tolist() == pytest.approx([1.0, 2 / 3, 1 / 3])
