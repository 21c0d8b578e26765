import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdm_hf.maths.activation import (
    SOFTMAX_EQUIVALENT_Q,
    high_reliability_mask,
    is_out_of_distribution,
    log_sdm,
    rescaled_similarity,
    sdm_activation,
    sdm_loss,
)


def test_softmax_equivalence():
    z = torch.randn(16, 5, dtype=torch.float64)
    q = torch.full((16,), SOFTMAX_EQUIVALENT_Q, dtype=torch.float64)
    torch.testing.assert_close(sdm_activation(z, q, torch.ones(16, dtype=torch.float64)), torch.softmax(z, -1))
    loss = sdm_loss(z, torch.arange(16) % 5, q, torch.ones(16, dtype=torch.float64))
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(z, torch.arange(16) % 5))


def test_zero_distance_is_uniform():
    z = torch.randn(4, 3) * 10
    out = sdm_activation(z, torch.tensor([0.0, 1.0, 5.0, 100.0]), torch.zeros(4))
    torch.testing.assert_close(out, torch.full((4, 3), 1 / 3))


def test_definition_and_column_shapes():
    z = torch.tensor([[1.0, -0.5, 2.0]], dtype=torch.float64)
    q, d = 3.0, 0.7
    expected = (2 + q) ** (d * z) / ((2 + q) ** (d * z)).sum()
    torch.testing.assert_close(sdm_activation(z, torch.tensor([q]), torch.tensor([[d]])), expected)
    torch.testing.assert_close(sdm_activation(z, q, d), expected)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6), st.integers(2, 6), st.floats(0, 200), st.floats(0, 1))
def test_log_path_agrees_with_probability_path(batch, classes, q, d):
    z = torch.randn(batch, classes, dtype=torch.float64) * 5
    qs = torch.full((batch,), q, dtype=torch.float64)
    ds = torch.full((batch,), d, dtype=torch.float64)
    p = sdm_activation(z, qs, ds)
    torch.testing.assert_close(log_sdm(z, qs, ds), torch.log(p) / math.log(2 + q))
    torch.testing.assert_close(p.sum(-1), torch.ones(batch, dtype=torch.float64))


def test_gradient_is_d_times_sdm_minus_onehot():
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    q = torch.tensor([0.0, 1.0, 2.0, 7.0, 30.0, 2048.0], dtype=torch.float64)
    d = torch.tensor([0.1, 0.5, 1.0, 0.3, 0.9, 0.0], dtype=torch.float64)
    sdm_loss(z, y, q, d, reduction="sum").backward()
    expected = d[:, None] * (sdm_activation(z.detach(), q, d) - torch.nn.functional.one_hot(y, 4))
    torch.testing.assert_close(z.grad, expected)


def test_q_and_d_get_no_gradient():
    z = torch.randn(3, 2, requires_grad=True)
    q = torch.ones(3, requires_grad=True)
    d = torch.full((3,), 0.5, requires_grad=True)
    sdm_loss(z, torch.tensor([0, 1, 0]), q, d).backward()
    assert q.grad is None and d.grad is None


def test_rescaled_similarity_bounds():
    q = torch.tensor([0, 1, 2, 10, 1000])
    p = torch.tensor([0.9, 0.5, 1.0, 0.99, 0.6])
    r = rescaled_similarity(q, p)
    assert r[0] == 0
    assert torch.all(r[1:] >= 1) and torch.all(r <= q)
    assert r[3] == 10
    torch.testing.assert_close(r[4], torch.tensor(1002.0**0.6))
    assert is_out_of_distribution(r).tolist() == [True, False, False, False, False]


def test_high_reliability_mask():
    p = torch.tensor([0.96, 0.96, 0.94, 0.99, 0.99])
    pred = torch.tensor([0, 1, 0, 0, 1])
    r = torch.tensor([3.0, 3.0, 3.0, 1.5, 0.0])
    psi = torch.tensor([0.95, 0.97], dtype=torch.float64)
    assert high_reliability_mask(p, pred, r, 2.0, psi).tolist() == [True, False, False, False, False]
    assert not high_reliability_mask(p, pred, r, math.inf, psi).any()
