import json

import torch

from sdm_hf.metrics import selective_classification_report


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
    from sdm_hf.metrics import evaluate_module_path

    metric = evaluate.load(evaluate_module_path())
    result = metric.compute(predictions=[0, 1, 1], references=[0, 0, 1], admitted=[True, True, False], num_classes=2)
    assert result["marginal"] == {"admitted": 2, "proportion": 2 / 3, "accuracy": 0.5}
    assert result["class_conditional"][1]["accuracy"] is None  # "R"


def test_selective_counts_rejects_labels_outside_the_classes():
    import pytest
    import torch

    from sdm_hf.metrics import selective_counts

    with pytest.raises(ValueError, match="labels must be integers in 0..1"):
        selective_counts(torch.tensor([0, 2]), torch.tensor([0, 1]), torch.tensor([True, True]), 2)
