"""benchmarks/efficiency.py: the procedure syntax and the tables rendered from the committed cells."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("efficiency_harness", ROOT / "benchmarks" / "efficiency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_procedure_syntax(harness):
    assert harness.parse_procedure("fast") == ("fast", {"procedure": "fast"})
    name, kwargs = harness.parse_procedure("x=procedure:fast,selection_fraction:0.25,normalization:feature")
    assert name == "x" and kwargs == {"procedure": "fast", "selection_fraction": 0.25, "normalization": "feature"}
    with pytest.raises(SystemExit, match="unknown procedure"):
        harness.parse_procedure("quick")


def test_committed_tables_are_the_rendering_of_the_committed_cells(harness):
    results = ROOT / "benchmarks" / "results"
    cells = json.loads((results / "efficiency.json").read_text(encoding="utf-8"))
    text = harness.render(cells)
    assert text == (results / "efficiency.md").read_text(encoding="utf-8")
    procedures = {cell["procedure"] for cell in cells.values()}
    assert {"paper", "fast"} <= procedures
    for procedure in procedures:
        assert f"| {procedure} |" in text
    assert "lower-bound variant" in text
