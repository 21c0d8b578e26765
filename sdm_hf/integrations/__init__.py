"""sdm_hf inside the libraries it plugs into: transformers pipelines (:mod:`.pipelines`:
``sdm-text-classification`` and ``sdm-verify``) and TRL (:mod:`.trl`: a verification head as a
reward for the online trainers)."""
