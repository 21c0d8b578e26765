"""`import sdm_hf` registers both pipeline tasks through transformers' public registry API."""

import subprocess
import sys

import pytest

from tests.helpers import build_encoder_repo


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def _lines(code: str) -> list[str]:
    done = _run(code)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


TASKS = "print(sorted(t for t in PIPELINE_REGISTRY.get_supported_tasks() if t.startswith('sdm')))\n"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_encoder_repo(tmp_path_factory.mktemp("enc"))[0]


def test_import_sdm_hf_registers_the_tasks(repo):
    lines = _lines(
        "import sys, sdm_hf\n"
        "print(any(type(f).__module__.startswith('sdm_hf') for f in sys.meta_path))\n"
        "from transformers import pipeline\n"
        "from transformers.pipelines import PIPELINE_REGISTRY\n" + TASKS + ""
        f"clf = pipeline('sdm-text-classification', model={str(repo)!r}, device='cpu')\n"
        "print(type(clf).__module__, clf('w1 w2')['label'] in ('neg', 'pos'))\n"
    )
    assert lines == [
        "False",  # no import hook
        "['sdm-text-classification', 'sdm-verify']",
        "sdm_hf.integrations.pipelines.text_classification True",
    ]


def test_registration_is_idempotent_and_silent():
    done = _run(
        "import transformers.pipelines\nimport sdm_hf\nimport sdm_hf.integrations.pipelines as p\n"
        "p.register_pipelines(); p.register_pipelines()\n"
        "from transformers.pipelines import PIPELINE_REGISTRY\n" + TASKS
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["['sdm-text-classification', 'sdm-verify']"]
    assert "already registered" not in done.stderr


def test_public_names():
    lines = _lines(
        "from sdm_hf.integrations.pipelines import SDMTextClassificationPipeline, SDMVerifyPipeline\n"
        "print(SDMVerifyPipeline.__module__, SDMTextClassificationPipeline.__module__)\n"
    )
    assert lines == ["sdm_hf.integrations.pipelines.verify sdm_hf.integrations.pipelines.text_classification"]


def test_a_failed_registration_warns_and_leaves_the_import_working():
    done = _run(
        "import transformers.pipelines as tp\n"
        "def boom(*args, **kwargs): raise RuntimeError('broken')\n"
        "tp.PIPELINE_REGISTRY.register_pipeline = boom\n"
        "import sdm_hf\n"
        "print('imported', sdm_hf.SDMHead.__name__)\n"
    )
    assert done.returncode == 0 and done.stdout.strip() == "imported SDMHead", done.stderr[-3000:]
    assert "sdm_hf could not register its pipeline tasks (RuntimeError: broken)" in done.stderr
