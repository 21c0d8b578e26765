import math

import numpy as np
import pytest
import torch

from sdm_hf.maths.calibration import (
    class_rescaled_lists,
    effective_sample_sizes,
    explain_empty_region,
    high_reliability_thresholds,
    lower_bound_margin,
    minimum_class_points,
)


def reference_algorithm_1(p, r, y, num_classes, alpha, min_points=0):
    """A direct transcription of Algorithm 1's definition (quadratic, for tests only), with the
    small-region guard: every class needs at least ``min_points`` points at or above ``t``."""
    p, r, y = p.double().numpy(), r.double().numpy(), y.numpy()
    keep = np.floor(r) > 0
    p, r, y = p[keep], r[keep], y[keep]
    for t in sorted(set(r.tolist())):
        psi = []
        for c in range(num_classes):
            s = sorted(p[(y == c) & (r >= t)].tolist())
            psi.append(0.0 if not s else s[min(int((1 - alpha) * len(s)), len(s) - 1)])
        counts = [int(((y == c) & (r >= t)).sum()) for c in range(num_classes)]
        if min(counts) >= min_points and all(np.float32(v) >= np.float32(alpha) for v in psi):
            return t, [float(np.float32(v)) for v in psi]
    return math.inf, [0.0] * num_classes


def random_case(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(0, 300, (1,), generator=g))
    num_classes = int(torch.randint(2, 5, (1,), generator=g))
    alpha = [0.6, 0.8, 0.9, 0.95, 0.99, 1.0][seed % 6]
    # probabilities concentrated near alpha, with exact ties (rounding) and exact alpha values
    p = (alpha - 0.1 + 0.2 * torch.rand(n, generator=g)).clamp(0, 1).round(decimals=2)
    p[torch.rand(n, generator=g) < 0.1] = alpha
    q = torch.randint(0, 12, (n,), generator=g).double()
    r = torch.minimum(q, (2 + q) ** p.double()).round(decimals=1)  # ties among q'
    y = torch.randint(0, num_classes - (seed % 5 == 0), (n,), generator=g)  # some empty classes
    return p.float(), r, y, num_classes, alpha


@pytest.mark.parametrize("seed", range(300))
def test_algorithm_1_equals_definition(seed):
    p, r, y, num_classes, alpha = random_case(seed)
    q_min, psi = high_reliability_thresholds(p, r, y, num_classes, alpha)
    ref_q_min, ref_psi = reference_algorithm_1(p, r, y, num_classes, alpha)
    assert q_min == ref_q_min
    assert psi.tolist() == pytest.approx(ref_psi, abs=0)


def test_found_and_not_found_cases_are_both_exercised():
    outcomes = {math.isfinite(high_reliability_thresholds(*random_case(s))[0]) for s in range(300)}
    assert outcomes == {True, False}


def test_no_threshold_and_explanation():
    p = torch.tensor([0.99, 0.5, 0.99, 0.99])
    r = torch.tensor([3.0, 3.0, 3.0, 0.0])
    y = torch.tensor([0, 0, 1, 1])
    q_min, psi = high_reliability_thresholds(p, r, y, 3, 0.95)
    assert q_min == math.inf and psi.tolist() == [0.0, 0.0, 0.0]
    text = explain_empty_region(p, r, y, 3, 0.95, {0: "a", 1: "b", 2: "c"})
    assert "'c' has no calibration point" in text and "20" in text


def test_tiny_inputs():
    assert (
        high_reliability_thresholds(torch.tensor([]), torch.tensor([]), torch.tensor([], dtype=torch.long), 2, 0.9)[0]
        == math.inf
    )
    q_min, psi = high_reliability_thresholds(
        torch.tensor([1.0, 1.0]), torch.tensor([1.0, 2.0]), torch.tensor([0, 1]), 2, 0.9
    )
    assert q_min == 1.0 and psi.tolist() == [1.0, 1.0]


def test_effective_sample_sizes_and_margin():
    lists = class_rescaled_lists(torch.tensor([0.0, 1.0, 2.0, 2.0, 5.0, 1.5]), torch.tensor([0, 0, 0, 0, 1, 1]), 2)
    ess = effective_sample_sizes(torch.tensor([0.0, 2.0, 10.0]), lists)
    # strictly below, capped at n_c - 1 (class 0 has 4 points, class 1 has 2)
    assert ess.tolist() == [[0, 0], [2, 1], [3, 1]]
    eps = lower_bound_margin(ess, 0.9)
    assert eps[0] == 1.0
    torch.testing.assert_close(eps[1], torch.tensor(math.sqrt(math.log(20) / 2)).clamp(max=1.0))
    torch.testing.assert_close(eps[2], torch.tensor(min(1.0, math.sqrt(math.log(20) / 2))))
    assert lower_bound_margin(ess, 1.0).tolist() == [1.0, 1.0, 1.0]
    big = effective_sample_sizes(
        torch.tensor([1e9]), class_rescaled_lists(torch.arange(1000.0), torch.zeros(1000).long(), 1)
    )
    torch.testing.assert_close(lower_bound_margin(big, 0.95)[0], torch.tensor(math.sqrt(math.log(40) / (2 * 999))))


@pytest.mark.parametrize("seed", range(0, 300, 3))
@pytest.mark.parametrize("setting", [1, 4, 12, "auto"])
def test_small_region_guard_equals_its_definition_and_only_empties(seed, setting):
    p, r, y, num_classes, alpha = random_case(seed)
    m = minimum_class_points(setting, alpha)
    q_min, psi = high_reliability_thresholds(p, r, y, num_classes, alpha, min_points=m)
    ref_q_min, ref_psi = reference_algorithm_1(p, r, y, num_classes, alpha, min_points=m)
    assert q_min == ref_q_min and psi.tolist() == pytest.approx(ref_psi, abs=0)
    plain_q_min, plain_psi = high_reliability_thresholds(p, r, y, num_classes, alpha)
    # the guard returns Algorithm 1's result unchanged or an empty region, never another region
    assert math.isinf(q_min) or (q_min == plain_q_min and torch.equal(psi, plain_psi))


def test_guard_outcomes_are_both_exercised_and_explained():
    kept = emptied = 0
    for seed in range(300):
        p, r, y, num_classes, alpha = random_case(seed)
        plain = high_reliability_thresholds(p, r, y, num_classes, alpha)[0]
        guarded = high_reliability_thresholds(p, r, y, num_classes, alpha, min_points=12)[0]
        kept += math.isfinite(guarded)
        emptied += math.isfinite(plain) and math.isinf(guarded)
    assert kept > 0 and emptied > 0
    # two classes whose only passing tail has 3 points each: Algorithm 1 admits it, the guard refuses
    p = torch.tensor([0.5] * 10 + [0.99] * 3 + [0.5] * 10 + [0.99] * 3)
    r = torch.tensor([float(i) for i in range(1, 14)] * 2)
    y = torch.tensor([0] * 13 + [1] * 13)
    assert high_reliability_thresholds(p, r, y, 2, 0.9)[0] == 11.0
    assert math.isinf(high_reliability_thresholds(p, r, y, 2, 0.9, min_points=10)[0])
    text = explain_empty_region(p, r, y, 2, 0.9, min_points=10)
    assert "small-region guard" in text and "10" in text


def test_minimum_class_points_values():
    assert minimum_class_points("auto", 0.95) == 20 and minimum_class_points("auto", 0.9) == 10
    assert minimum_class_points(0, 0.95) == 0 and minimum_class_points(7, 0.9) == 7
    for bad in (-1, 2.5, True, "many"):
        with pytest.raises(ValueError, match="min_class_points must be 'auto' or an integer >= 0"):
            minimum_class_points(bad, 0.9)
