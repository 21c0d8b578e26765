"""SDMFitConfig: fit_sdm_head's training settings as a dataclass that HfArgumentParser reads."""

import inspect

import pytest
from transformers import HfArgumentParser

from sdm_hf import fit_sdm_head
from sdm_hf.training.fit import PROCEDURES
from sdm_hf.training.fit_config import SDMFitConfig


def test_every_setting_is_a_fit_sdm_head_keyword_with_the_same_default():
    keywords = inspect.signature(fit_sdm_head).parameters
    for name, value in SDMFitConfig().to_kwargs().items():
        assert name in keywords and keywords[name].default == value, name


def test_command_line_options_parse_into_the_config():
    parser = HfArgumentParser(SDMFitConfig)
    (settings,) = parser.parse_args_into_dataclasses(
        ["--procedure", "fast", "--epochs", "3", "--learning-rate", "1e-4", "--resplit", "false", "--no_use_sdm_loss"]
    )
    assert settings == SDMFitConfig(procedure="fast", epochs=3, learning_rate=1e-4, resplit=False, use_sdm_loss=False)
    (settings,) = parser.parse_args_into_dataclasses(["--resplit", "true"])
    assert settings.resplit is True and settings.procedure == "auto" and settings.epochs is None
    with pytest.raises(SystemExit):  # argparse refuses an unknown procedure
        parser.parse_args_into_dataclasses(["--procedure", "slow"])


def test_unknown_procedure_is_refused():
    assert set(SDMFitConfig.__dataclass_fields__["procedure"].metadata["choices"]) == set(PROCEDURES)
    with pytest.raises(ValueError, match="procedure must be one of"):
        SDMFitConfig(procedure="slow")
