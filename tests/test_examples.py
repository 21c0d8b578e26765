"""The examples run as documented."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_grpo_with_the_sdm_reward_runs(tmp_path):
    pytest.importorskip("trl")
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "grpo_with_sdm_reward.py"), "--steps", "2", "--output",
         str(tmp_path / "grpo")],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line for line in res.stdout.splitlines() if line.strip()[:1].isdigit() and "|" in line]
    assert len(rows) == 2  # one reward row per GRPO step
    for row in rows:
        reward, hr, ood = (float(v) for v in row.split("|")[1:])
        assert 0.0 <= reward <= 1.0 and 0.0 <= hr <= 1.0 and 0.0 <= ood <= 1.0
