"""Judging selective classifiers: accuracy and admission per class and per prediction with
intervals (:mod:`.metrics`), figures (:mod:`.plots`) and an optional ``evaluate`` module
(``evaluate.load(sdm_hf.evaluation.metrics.evaluate_module_path())``)."""
