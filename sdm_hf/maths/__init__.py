"""The SDM maths as pure tensor functions, no I/O or model code (Schmaltz 2025, arXiv:2509.12760).

:mod:`.activation`: ``sdm(z')``, its loss, ``q'`` and the HR rule; :mod:`.similarity`: ``q`` and ``d_nearest``;
:mod:`.distance`: ``d``; :mod:`.calibration`: Algorithm 1 and the lower-bound variant.
"""
