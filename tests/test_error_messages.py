"""Errors name the thing and the fix: a missing local folder is not reported as a Hub or
connection failure, a name that can be both says both, data errors give file and line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sdm_hf import SDMHead, load_causal_lm
from sdm_hf.integrations.trl import SDMVerificationReward
from sdm_hf.repository import load_sdm_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Offline whatever the environment (the library reads the flag at import)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


LOADERS = [SDMHead.from_pretrained, load_causal_lm, SDMVerificationReward.from_pretrained, load_sdm_model]


@pytest.mark.parametrize("loader", LOADERS, ids=lambda f: f.__qualname__)
def test_a_missing_local_path_is_reported_as_missing(loader, tmp_path, monkeypatch):
    for name in (str(tmp_path / "nothing"), "./nothing-here", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="no such folder") as info:
            loader(name)
        assert "connection" not in str(info.value) and "huggingface.co" not in str(info.value)


@pytest.mark.parametrize("loader", LOADERS, ids=lambda f: f.__qualname__)
def test_a_name_that_can_be_a_repo_id_says_both_readings(loader, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'out/head' is not a local folder .* the Hub is offline"):
        loader("out/head")


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "sdm_hf.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        timeout=300,
    )


def test_cli_data_errors_name_file_and_line(tmp_path):
    good = {"vec": [0.1, 0.2], "label": 0}
    latin = tmp_path / "latin1.jsonl"
    second = '{"text": "caf\xe9", "vec": [1, 2], "label": 1}\n'.encode("latin-1")  # é is byte 14
    latin.write_bytes((json.dumps(good) + "\n").encode() + second)
    scalars = tmp_path / "scalars.jsonl"
    scalars.write_text(json.dumps(good) + "\n" + json.dumps({"vec": 0.5, "label": 1}) + "\n")
    ragged = tmp_path / "ragged.jsonl"
    ragged.write_text(json.dumps(good) + "\n" + json.dumps({"vec": [1.0], "label": 1}) + "\n")
    huge = tmp_path / "huge_label.jsonl"
    huge.write_text(json.dumps(good) + "\n" + json.dumps({"vec": [1.0, 2.0], "label": 2**40}) + "\n")
    cases = [
        (huge, f"{huge}:2: label 1099511627776 is outside 0..1 (labels are class indices"),
        (latin, f"{latin}:2: not UTF-8 text (byte 0xe9 at column 14)"),
        (scalars, f"{scalars}:2: column 'vec' must hold equal-length lists of numbers, found float 0.5"),
        (ragged, f"{ragged}:2: column 'vec' must hold equal-length lists of numbers, found a list of 1 values"),
    ]
    for path, message in cases:
        res = _cli("fit-head", "--train", path, "--calibration", path, "--vector-column", "vec",
                   "--output", tmp_path / "out", cwd=tmp_path)  # fmt: skip
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert message in res.stderr, res.stderr
    text = tmp_path / "inputs.txt"
    text.write_bytes(b"fine\n\xff\xfe bad\n")
    res = _cli("verify", "--head", "./no-head", "--input", text, cwd=tmp_path)
    assert res.returncode == 2 and "no such folder: './no-head'" in res.stderr and "Traceback" not in res.stderr
