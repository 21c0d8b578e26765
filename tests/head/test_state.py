import math

import pytest
import torch

from sdm_hf import SDMHead
from sdm_hf.head.state import CalibrationState, SDMHeadState, calibrate, weight_shapes, with_alpha
from sdm_hf.maths.calibration import high_reliability_thresholds

OUTPUT_FIELDS = ("prediction", "probabilities", "q", "d", "in_hr", "in_hr_lower", "nearest_index")


def test_weight_shapes_match_the_module(small_head):
    head, _, _ = small_head
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == weight_shapes(head.config)


def test_round_trip_through_state_is_exact_and_shares_nothing_mutable(small_head):
    head, x, _ = small_head
    state = head.to_state()
    assert isinstance(state, SDMHeadState) and state.support.size == head.support.ntotal
    copy = SDMHead.from_state(state)
    a, b = head.predict(x[:50]), copy.predict(x[:50])
    for name in OUTPUT_FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    copy.add_to_support(x[:5], torch.zeros(5, dtype=torch.long))
    assert copy.calibration_is_stale and not head.calibration_is_stale
    assert head.support.ntotal == state.support.size


def test_from_state_rejects_other_objects():
    with pytest.raises(TypeError, match="SDMHeadState"):
        SDMHead.from_state({"config": None})


def test_calibrate_is_pure_and_runs_algorithm_1(small_head):
    head, _, _ = small_head
    cal = head.calibration
    logits = torch.log(cal.probabilities.clamp_min(1e-30))  # any logits with the same argmax
    before = {k: v.clone() for k, v in cal.arrays().items()}
    fresh = calibrate(cal.labels, logits, cal.q, cal.d_nearest, 2, alpha=0.8)
    assert isinstance(fresh, CalibrationState) and fresh.alpha == 0.8
    assert torch.equal(fresh.d, cal.d)  # d depends on q and the distances only
    q_min, psi = high_reliability_thresholds(
        fresh.true_class_probability, fresh.rescaled_similarity, fresh.labels, 2, 0.8
    )
    assert (fresh.q_min == q_min or (math.isinf(q_min) and math.isinf(fresh.q_min))) and torch.equal(
        fresh.thresholds, psi
    )
    for k, v in cal.arrays().items():  # the input state is untouched
        assert torch.equal(v, before[k]), k


def test_with_alpha_returns_a_new_state(small_head):
    head, _, _ = small_head
    cal = head.calibration
    other = with_alpha(cal, 0.8)
    assert other is not cal and other.alpha == 0.8 and cal.alpha == head.alpha
    assert torch.equal(other.rescaled_similarity, cal.rescaled_similarity)  # only Algorithm 1 reran
    head.recalibrate(alpha=0.8)
    assert head.q_min == other.q_min and torch.equal(head.thresholds, other.thresholds)


def test_to_state_is_an_independent_snapshot_by_default(small_head):
    head, x, y = small_head
    state = head.to_state()
    vectors = state.support.vectors.clone()
    head.add_to_support(x[:50], y[:50])  # FAISS reallocates its storage
    head.recalibrate(alpha=0.8)
    assert torch.equal(state.support.vectors, vectors) and state.support.size == 300
    assert state.config is not head.config and state.config.alpha == 0.9
    shared = head.to_state(copy=False)  # the saving path: no copies
    assert shared.config is head.config
