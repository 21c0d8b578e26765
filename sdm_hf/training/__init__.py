"""Fitting SDM heads: :mod:`.fit` (``fit_sdm_head`` and its named procedures), the training loop
it runs (:mod:`.head_training`), the default procedure's choice of settings on held-out training
rows (:mod:`.setting_choice`) and the baselines the demo compares against (:mod:`.baselines`:
linear probe, CE adaptor, temperature scaling, APS, RAPS)."""
