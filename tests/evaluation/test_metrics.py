import json
import math

import pytest
import torch

from sdm_hf.evaluation.metrics import selective_classification_report, wilson_interval


def test_report_groups_and_all_rejected():
    y = torch.tensor([0, 0, 1, 1, 1])
    pred = torch.tensor([0, 1, 1, 1, 0])
    report = selective_classification_report(
        y,
        {"some": (pred, torch.tensor([True, True, True, False, False])), "none": (pred, torch.zeros(5, dtype=bool))},
        2,
        id2label={0: "no", 1: "yes"},
    )
    some, none = report.rows
    assert some["marginal"] == {"admitted": 3, "proportion": 0.6, "accuracy": 2 / 3}
    assert some["class_conditional"][0] == {"admitted": 2, "proportion": 0.4, "accuracy": 0.5}
    assert some["prediction_conditional"][1] == {"admitted": 2, "proportion": 0.4, "accuracy": 0.5}
    assert none["marginal"]["accuracy"] is None
    table = report.to_markdown()
    assert "| none | R | R | R | R | R |" in table and "y=no" in table
    json.dumps(report.to_dict(), allow_nan=False)


def test_evaluate_module_loads_offline():
    import pytest

    evaluate = pytest.importorskip("evaluate")
    from sdm_hf.evaluation.metrics import evaluate_module_path

    metric = evaluate.load(evaluate_module_path())
    result = metric.compute(predictions=[0, 1, 1], references=[0, 0, 1], admitted=[True, True, False], num_classes=2)
    assert result["marginal"] == {"admitted": 2, "proportion": 2 / 3, "accuracy": 0.5}
    assert result["class_conditional"][1]["accuracy"] is None  # "R"


def test_selective_counts_rejects_labels_outside_the_classes():
    import pytest
    import torch

    from sdm_hf.evaluation.metrics import selective_counts

    with pytest.raises(ValueError, match="labels must be integers in 0..1"):
        selective_counts(torch.tensor([0, 2]), torch.tensor([0, 1]), torch.tensor([True, True]), 2)


def test_wilson_interval_known_values_coverage_and_errors():
    # 9/10: the textbook Wilson 95% interval (0.596, 0.982); ends and empty sets
    assert wilson_interval(9, 10) == pytest.approx((0.5958, 0.9821), abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4) and wilson_interval(0, 0) is None
    # symmetric in successes and failures, always around the observed rate, narrower with more data
    for k, n in ((3, 7), (50, 200), (1, 1000)):
        low, high = wilson_interval(k, n)
        assert low <= k / n <= high
        assert (1 - high, 1 - low) == pytest.approx(wilson_interval(n - k, n))
    assert math.prod(wilson_interval(400, 500)) > 0 and (
        wilson_interval(400, 500)[1] - wilson_interval(400, 500)[0]
        < wilson_interval(4, 5)[1] - wilson_interval(4, 5)[0]
    )
    for bad in ((5, 3), (-1, 3), (1, -1)):
        with pytest.raises(ValueError, match="successes"):
            wilson_interval(*bad)
    with pytest.raises(TypeError, match="integers"):
        wilson_interval(1.5, 3)
    with pytest.raises(ValueError, match="z must be"):
        wilson_interval(1, 3, z=0)
