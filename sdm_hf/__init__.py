"""sdm_hf: Similarity-Distance-Magnitude activations and SDM estimators for Hugging Face users.

The public entry points::

    from sdm_hf import SDMClassifier                  # a model id + labelled texts -> decisions
    from sdm_hf import SDMConfig, SDMHead, SDMOutput, fit_sdm_head
    from transformers import pipeline
    pipeline("sdm-text-classification", model=...)   # registered on import
"""

from .classifier import SDMClassifier
from .features.cache import cached_features
from .features.composition import FeatureEncoder, compose_features, extract_composed_features
from .features.model_loading import load_causal_lm
from .head.config import SDMConfig
from .head.diagnostics import CalibrationReport, LabelErrors
from .head.inference import SDMOutput
from .head.modeling import SDMHead
from .integrations.pipelines import register_when_transformers_pipelines_loads
from .maths.activation import log_sdm, rescaled_similarity, sdm_activation, sdm_loss
from .maths.calibration import high_reliability_thresholds
from .training.fit import fit_sdm_head
from .utils.files import default_cache_dir

# `import sdm_hf` makes pipeline("sdm-verify") / ("sdm-text-classification") work; the tasks are
# registered when transformers.pipelines loads, so importing sdm_hf does not pay for it
register_when_transformers_pipelines_loads()

__version__ = "0.1.0"

__all__ = [
    "SDMClassifier",
    "SDMConfig",
    "SDMHead",
    "SDMOutput",
    "CalibrationReport",
    "LabelErrors",
    "fit_sdm_head",
    "sdm_activation",
    "log_sdm",
    "sdm_loss",
    "rescaled_similarity",
    "high_reliability_thresholds",
    "load_causal_lm",
    "cached_features",
    "extract_composed_features",
    "compose_features",
    "FeatureEncoder",
    "default_cache_dir",
    "__version__",
]
