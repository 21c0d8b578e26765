"""The SDM maths, pure tensor functions with no I/O and no model code.

* :mod:`.activation`: the SDM activation ``sdm(z')``, its change-of-base loss, ``q'`` and the
  high-reliability rule (Schmaltz 2025, *Similarity-Distance-Magnitude Activations*,
  arXiv:2509.12760).
* :mod:`.similarity`: the similarity ``q`` and the nearest distance, over any neighbour searcher.
* :mod:`.distance`: class-wise empirical CDFs of distances and the distance quantile ``d``.
* :mod:`.calibration`: Algorithm 1 (the HR region's ``q'_min`` and per-class thresholds),
  effective sample sizes and the lower-bound variant.
"""
