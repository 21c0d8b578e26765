"""What `import sdm_hf` costs: it registers the pipelines but leaves the trainer stack alone."""

import subprocess
import sys


def test_import_registers_pipelines_without_the_trainer_stack():
    code = (
        "import sys, sdm_hf\n"
        "from transformers.pipelines import PIPELINE_REGISTRY\n"
        "print(sorted(t for t in PIPELINE_REGISTRY.get_supported_tasks() if t.startswith('sdm')))\n"
        "print('transformers.trainer' in sys.modules, 'datasets' in sys.modules)\n"
        "from sdm_hf.lm import SDMTrainer, SDMTrainingArguments, exact_match_verifier\n"
        "print(SDMTrainer.__module__, SDMTrainingArguments.__module__, exact_match_verifier.__module__)\n"
        "from sdm_hf.lm import HardNegativeCallback, HeadRefreshCallback, SDMEpochState\n"
        "print(HardNegativeCallback.__module__, HeadRefreshCallback.__module__, SDMEpochState.__module__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()
    assert lines[0] == "['sdm-text-classification', 'sdm-verify']"
    assert lines[1] == "False False"  # transformers.Trainer and datasets load on first use only
    assert lines[2] == "sdm_hf.lm.sdm_trainer sdm_hf.lm.sdm_config sdm_hf.lm.sdm_trainer"
    assert lines[3] == "sdm_hf.lm.callbacks sdm_hf.lm.callbacks sdm_hf.lm.state"
