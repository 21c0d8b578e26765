"""sdm_hf's library logger: transformers' conventions (own handler, no propagation, verbosity)."""

import logging
import os
import subprocess
import sys

from sdm_hf.utils import logging as sdm_logging


def test_verbosity_setters_and_module_loggers():
    sdm_logging.set_verbosity_info()
    assert sdm_logging.get_verbosity() == logging.INFO
    sdm_logging.set_verbosity_error()
    assert sdm_logging.get_verbosity() == logging.ERROR
    assert sdm_logging.get_logger("sdm_hf.lm.epochs").getEffectiveLevel() == logging.ERROR  # inherited


def _child(code: str, verbosity: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SDM_HF_VERBOSITY"}
    if verbosity is not None:
        env["SDM_HF_VERBOSITY"] = verbosity
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)


def test_environment_sets_the_level_and_records_go_to_stderr_once():
    code = (
        "import logging\nlogging.basicConfig(level=logging.DEBUG)\n"  # an application's own root handler
        "from sdm_hf.utils.logging import get_logger\n"
        "log = get_logger('sdm_hf.features.cache')\nlog.info('an info line')\nlog.warning('a warning line')\n"
    )
    default = _child(code, None).stderr
    assert "a warning line" in default and "an info line" not in default
    assert default.count("a warning line") == 1  # the library handler only: no propagation to the root's
    info = _child(code, "info").stderr
    assert "[sdm_hf.features.cache] INFO: an info line" in info
    unknown = _child(code, "loud").stderr
    assert "unknown SDM_HF_VERBOSITY='loud'" in unknown and "an info line" not in unknown
