import math

import pytest
import torch

from sdm_hf.training.baselines import (
    conformal_rule,
    conformal_scores,
    conformal_sets,
    conformal_threshold,
    fit_linear_probe,
    fit_temperature,
    sdm_rules,
    softmax_rule,
)


def test_softmax_rule_known_answers():
    logits = torch.log(torch.tensor([[0.96, 0.04], [0.6, 0.4], [0.01, 0.99]]))
    pred, admit = softmax_rule(logits, 0.95)
    assert pred.tolist() == [0, 0, 1] and admit.tolist() == [True, False, True]
    _, admit_t = softmax_rule(logits, 0.9, temperature=2.0)  # flatter: 0.96 -> 0.83, 0.99 -> 0.91
    assert admit_t.tolist() == [False, False, True]


def test_temperature_recovers_known_scale():
    g = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 3, generator=g) * 2
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=g).squeeze(1)
    t = fit_temperature(true_logits * 3.0, labels)  # over-confident by 3x
    assert abs(t - 3.0) < 0.3


def test_aps_and_raps_by_hand():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]])
    scores = conformal_scores(p)
    torch.testing.assert_close(scores, torch.tensor([[0.7, 0.9, 1.0], [0.5, 0.8, 1.0]], dtype=torch.float64))
    raps = conformal_scores(p, penalty=0.1, k_reg=1)
    torch.testing.assert_close(raps, torch.tensor([[0.7, 1.0, 1.2], [0.5, 0.9, 1.2]], dtype=torch.float64))
    sets = conformal_sets(p, 0.75)
    assert sets.tolist() == [[True, False, False], [True, False, False]]
    pred, single = conformal_rule(p, 0.85)
    assert pred.tolist() == [0, 0] and single.tolist() == [True, False]


def test_conformal_threshold_quantile():
    p = torch.tensor([[0.9, 0.1]] * 9 + [[0.2, 0.8]])
    y = torch.zeros(10, dtype=torch.long)
    # true-class scores: nine 0.9 and one 1.0; ceil(11 * 0.8) = 9th smallest = 0.9
    assert conformal_threshold(p, y, 0.8) == pytest.approx(0.9)
    assert conformal_threshold(p, y, 0.95) == math.inf  # ceil(11 * 0.95) = 11 > n


def test_linear_probe_learns_separable_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    probe = fit_linear_probe(x, y, num_classes=2, epochs=300)
    assert (probe(x).argmax(1) == y).float().mean() > 0.95


def test_sdm_rules_from_output():
    out = type("O", (), {})()
    out.logits = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    out.prediction = torch.tensor([0, 1])
    out.d = torch.tensor([1.0, 0.0])
    out.predicted_probability = torch.tensor([0.99, 0.5])
    out.in_hr = torch.tensor([True, False])
    out.in_hr_lower = torch.tensor([False, False])
    rules = sdm_rules(out, 0.9)
    assert rules["softmax(z') >= alpha"][1].tolist() == [True, False]
    assert rules["softmax(d z') >= alpha"][1].tolist() == [True, False]
    assert rules["sdm >= alpha"][1].tolist() == [True, False]
    assert rules["sdm HR lower"][1].tolist() == [False, False]
