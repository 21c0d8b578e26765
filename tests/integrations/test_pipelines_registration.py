"""`import sdm_hf` registers the tasks without importing transformers.pipelines: they are
registered when transformers.pipelines loads (or at once when it already has)."""

import subprocess
import sys

import pytest

from tests.helpers import build_encoder_repo


def _run(code: str) -> list[str]:
    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


TASKS = "print(sorted(t for t in PIPELINE_REGISTRY.get_supported_tasks() if t.startswith('sdm')))\n"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_encoder_repo(tmp_path_factory.mktemp("enc"))[0]


def test_import_sdm_hf_leaves_transformers_pipelines_alone_until_it_is_used(repo):
    lines = _run(
        "import sys, sdm_hf\n"
        "print('transformers.pipelines' in sys.modules, 'transformers.modeling_utils' in sys.modules)\n"
        "from transformers import pipeline\n"
        "from transformers.pipelines import PIPELINE_REGISTRY\n" + TASKS + "import os\n"
        f"clf = pipeline('sdm-text-classification', model={str(repo)!r}, device='cpu')\n"
        "print(type(clf).__module__, clf('w1 w2')['label'] in ('neg', 'pos'))\n"
        "print(any(type(f).__name__ == 'RegisterOnImport' for f in sys.meta_path))\n"
    )
    assert lines == [
        "False False",
        "['sdm-text-classification', 'sdm-verify']",
        "sdm_hf.integrations.pipelines.text_classification True",
        "False",  # the hook removed itself
    ]


def test_transformers_pipelines_imported_first():
    lines = _run(
        "import transformers.pipelines\nimport sdm_hf\nfrom transformers.pipelines import PIPELINE_REGISTRY\n" + TASKS
    )
    assert lines == ["['sdm-text-classification', 'sdm-verify']"]


def test_public_names_and_explicit_registration():
    lines = _run(
        "import sys, sdm_hf.integrations.pipelines as p\n"
        "print('transformers.pipelines' in sys.modules)\n"
        "from sdm_hf.integrations.pipelines import SDMTextClassificationPipeline, SDMVerifyPipeline\n"
        "print(SDMVerifyPipeline.__module__, SDMTextClassificationPipeline.__module__)\n"
        "p.register_pipelines(); p.register_pipelines()\n"
        "from transformers.pipelines import PIPELINE_REGISTRY\n" + TASKS
    )
    assert lines == [
        "False",
        "sdm_hf.integrations.pipelines.verify sdm_hf.integrations.pipelines.text_classification",
        "['sdm-text-classification', 'sdm-verify']",
    ]


def test_a_failed_registration_warns_and_leaves_the_import_working():
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sdm_hf, sdm_hf.integrations.pipelines.registration as r\n"
            "def boom(): raise ImportError('broken')\n"
            "r.register_pipelines = boom\n"
            "import transformers.pipelines\n"
            "print('imported')\n",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and done.stdout.strip() == "imported"
    assert "sdm_hf could not register its pipeline tasks (ImportError: broken)" in done.stderr
