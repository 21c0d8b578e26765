from sdm_hf.head.diagnostics import calibration_report, output_agreement
from sdm_hf.maths.activation import high_reliability_mask


def test_report_counts_agree_with_a_direct_count(small_head):
    head, _, _ = small_head
    cal = head.calibration
    report = calibration_report(cal, alphas=[0.8], id2label={0: "neg", 1: "pos"})
    assert sorted({r["alpha"] for r in report.rows}) == sorted({0.8, cal.alpha})
    admitted = high_reliability_mask(
        cal.predicted_probability, cal.predictions, cal.rescaled_similarity, cal.q_min, cal.thresholds
    )
    for row in (r for r in report.rows if r["alpha"] == cal.alpha):
        c = row["class"]
        mine = admitted & (cal.labels == c)
        assert row["n"] == int((cal.labels == c).sum()) and row["admitted"] == int(mine.sum())
        if row["admitted"]:
            assert row["accuracy"] == int((cal.predictions[mine] == c).sum()) / row["admitted"]
        else:
            assert row["accuracy"] is None
    assert report.admitted_at() == (int(admitted.sum()), cal.size)


def test_rejected_groups_show_as_R():
    from sdm_hf.head.diagnostics import CalibrationReport

    row = {
        "alpha": 0.9,
        "class": 0,
        "label": "a",
        "n": 3,
        "ood": 0,
        "admitted": 0,
        "admitted_fraction": 0.0,
        "accuracy": None,
        "predicted_admitted": 0,
        "prediction_accuracy": None,
        "psi": 0.0,
        "q_min": float("inf"),
    }
    text = CalibrationReport(rows=[row], chosen_alpha=0.9).to_markdown()
    assert "| R | R |" in text and "inf" in text


def test_identical_outputs_agree_fully(small_head):
    head, x, _ = small_head
    out = head.predict(x[:20])
    assert output_agreement(out, out) == {
        "n": 20,
        "same_q": 1.0,
        "same_d": 1.0,
        "same_nearest": 1.0,
        "same_hr": 1.0,
        "same_hr_lower": 1.0,
    }
