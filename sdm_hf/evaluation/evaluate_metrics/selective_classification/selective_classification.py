"""`evaluate` metric wrapping :func:`sdm_hf.evaluation.metrics.selective_classification_report` (the primary API;
this needs ``pip install 'sdm-hf[evaluate]'``). Loads offline::

    metric = evaluate.load(sdm_hf.evaluation.metrics.evaluate_module_path())
    metric.compute(predictions=[0, 1], references=[0, 0], admitted=[True, True], num_classes=2)
"""

import datasets
import evaluate

from sdm_hf.evaluation.metrics import selective_classification_report

_DESCRIPTION = """Selective-classification accuracy and admission: marginal, class-conditional (by
true label) and prediction-conditional (by predicted label); accuracy is None ("R") for a
group where nothing is admitted. Proportions are over all points."""

_KWARGS = """
Args:
    predictions: predicted class per point.
    references: true class per point.
    admitted: bool per point, True where the estimator answers (e.g. SDM's in_hr).
    num_classes: C.
Returns:
    dict with "marginal", "class_conditional" and "prediction_conditional" entries.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class SelectiveClassification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                    "admitted": datasets.Value("bool"),
                }
            ),
        )

    def _compute(self, predictions, references, admitted, num_classes=2):
        report = selective_classification_report(references, {"estimator": (predictions, admitted)}, num_classes)
        row = report.rows[0]
        return {key: row[key] for key in ("marginal", "class_conditional", "prediction_conditional")}
