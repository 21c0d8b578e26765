"""diagnose_region: agrees with Algorithm 1, names the limiting class, sizes the data a class needs."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from sdm_hf.head.diagnostics import calibration_report
from sdm_hf.head.region_diagnosis import diagnose_region, points_needed
from sdm_hf.maths.activation import high_reliability_mask
from sdm_hf.maths.calibration import high_reliability_thresholds


@pytest.mark.parametrize("alpha", [None, 0.8, 0.99])
def test_admitted_and_q_min_equal_algorithm_1(small_head, alpha):
    head, _, _ = small_head
    cal = head.calibration
    at = cal.alpha if alpha is None else alpha
    q_min, psi = high_reliability_thresholds(
        cal.true_class_probability, cal.rescaled_similarity, cal.labels, len(cal.distance_lists), at
    )
    direct = high_reliability_mask(cal.predicted_probability, cal.predictions, cal.rescaled_similarity, q_min, psi)
    d = diagnose_region(cal, alpha)
    assert d.q_min == q_min or (math.isinf(d.q_min) and math.isinf(q_min))
    assert d.admitted == (int(direct.sum()) if math.isfinite(q_min) else 0)
    assert d.limiting_class is not None and d.classes[d.limiting_class]["threshold"] == max(
        c["threshold"] for c in d.classes
    )
    assert all(c["threshold"] <= d.q_min for c in d.classes)  # each class's own condition holds by q'_min
    json.dumps(d.to_dict(), allow_nan=False)  # strict JSON


def _calibration(p_true, r, labels, num_classes=2, min_class_points=0):
    p_true, r, labels = torch.tensor(p_true), torch.tensor(r), torch.tensor(labels)
    probs = torch.zeros(len(labels), num_classes)
    probs[torch.arange(len(labels)), labels] = p_true
    probs[torch.arange(len(labels)), 1 - labels] = 1 - p_true
    return SimpleNamespace(
        alpha=0.9,
        true_class_probability=p_true,
        rescaled_similarity=r,
        labels=labels,
        predictions=probs.argmax(1),
        predicted_probability=probs.max(1).values,
        distance_lists=[torch.zeros(1)] * num_classes,
        min_class_points=min_class_points,
    )


def test_a_noisy_class_is_named_and_more_data_of_it_cannot_help():
    # class 0: 40 confident correct points; class 1: 40 points of which 1 in 4 is below alpha at every q'
    r = [float(i) for i in range(1, 41)] * 2
    p = [0.99] * 40 + [0.5 if i % 4 == 0 else 0.99 for i in range(40)]
    d = diagnose_region(_calibration(p, r, [0] * 40 + [1] * 40), id2label={0: "clean", 1: "noisy"})
    assert d.limiting_class == 1 and d.classes[1]["label"] == "noisy"
    assert d.classes[1]["hit_rate"] == 0.75
    # only its three most similar points (q' >= 38, all clean) pass: too few to trust (10 needed at 0.9)
    assert d.classes[1]["threshold"] == 38.0 and d.classes[1]["region_n"] == 3
    assert d.classes[1]["region_hit_rate"] == 1.0 and d.classes[1]["points_needed"] == 10
    assert d.classes[0]["points_needed"] == 10  # h = 1: at least 1 / (1 - 0.9)
    text = str(d)
    assert "Limiting class: noisy" in text and "from q' >= 38: 3 points" in text
    assert any("only the most similar points of noisy" in a for a in d.advice)
    assert any("noisy (has 3 from q' >= 38, about 10 needed)" in a for a in d.advice)


def test_a_class_that_holds_nowhere_is_told_more_data_will_not_help():
    r = [float(i) for i in range(1, 41)] * 2
    p = [0.99] * 40 + [0.5 if i % 2 else 0.99 for i in range(40)]  # the most similar point is below alpha
    d = diagnose_region(_calibration(p, r, [0] * 40 + [1] * 40), id2label={0: "clean", 1: "noisy"})
    assert math.isinf(d.classes[1]["threshold"]) and d.classes[1]["points_needed"] is None
    assert "more data of the same kind will not change that" in str(d)
    assert any("will not reach alpha at any similarity threshold" in a for a in d.advice)


def test_the_diagnosis_never_contradicts_the_report_table():
    """A class admitted in bulk at accuracy 1 (its low-similarity points are the wrong ones) is not
    told that it cannot reach alpha, and its point count is the table's."""
    r = [float(i) for i in range(1, 101)] * 2
    p = [0.99] * 100 + [0.3 if i < 12 else 0.99 for i in range(100)]  # 88% hits, all at high q'
    cal = _calibration(p, r, [0] * 100 + [1] * 100)
    cal.rescaled_similarity[0] = 0.0  # one OOD point of class 0
    d = diagnose_region(cal)
    assert d.classes[1]["hit_rate"] == pytest.approx(0.88) and d.classes[1]["region_hit_rate"] >= 0.9
    assert "cannot" not in str(d) and "will not" not in str(d)
    assert [c["n"] for c in d.classes] == [100, 100] and d.classes[0]["non_ood"] == 99


def test_a_class_that_passes_on_too_few_points_is_told_how_many_it_needs():
    # class 1: 20 points, 19 of them above alpha: h = 0.95 passes Algorithm 1 but needs ~76 points at 2 SE
    r = [float(i) for i in range(1, 21)] * 2
    p = [0.99] * 20 + [0.5] + [0.99] * 19
    d = diagnose_region(_calibration(p, r, [0] * 20 + [1] * 20))
    assert d.admitted > 0
    assert d.classes[1]["points_needed"] == 76  # 4 * 0.95 * 0.05 / 0.05^2
    assert any("about 76 needed" in a for a in d.advice)


def test_points_needed_edges():
    assert points_needed(None, 0.9) is None and points_needed(0.9, 0.9) is None and points_needed(0.5, 0.9) is None
    assert points_needed(1.0, 0.95) == 20  # no error observed: still the fewest Algorithm 1 can use
    assert points_needed(0.97, 0.95) > points_needed(0.99, 0.95)


def test_calibration_report_carries_the_diagnosis(small_head):
    head, _, _ = small_head
    report = head.calibration_report(alphas=[0.8])
    assert report.diagnosis is not None and report.diagnosis.alpha == head.calibration.alpha
    assert "Limiting class" in str(report)
    assert report.to_dict()["diagnosis"]["n"] == head.calibration.size
    assert calibration_report(head.calibration, [0.8]).diagnosis.admitted == report.diagnosis.admitted


def test_the_guard_is_named_when_it_empties_the_region():
    # both classes pass Algorithm 1 only in their top 5 points: a region the guard (10 at 0.9) refuses
    r = [float(i) for i in range(1, 41)] * 2
    p = [0.5 if i < 35 else 0.99 for i in range(40)] * 2
    labels = [0] * 40 + [1] * 40
    assert math.isfinite(diagnose_region(_calibration(p, r, labels)).q_min)
    d = diagnose_region(_calibration(p, r, labels, min_class_points="auto"))
    assert math.isinf(d.q_min) and d.admitted == 0
    assert "small-region guard (min_class_points: 10 per class) emptied the region" in d.advice[0]
