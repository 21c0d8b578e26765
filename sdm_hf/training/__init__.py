"""Fitting SDM heads: :func:`~sdm_hf.training.fit.fit_sdm_head`, its training loop, the ``"auto"`` setting
choice and the baselines to compare with."""
