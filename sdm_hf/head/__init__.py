"""The SDM estimator over frozen features.

Modules, in dependency order: ``config`` (:class:`SDMConfig`), ``state`` (the head as plain
data and the calibration steps as pure functions), ``support`` (the support set behind a FAISS
index), ``inference`` (:class:`SDMOutput` assembly), ``diagnostics`` (calibration report,
label errors, index agreement), ``model_card``, ``hub`` (Hub mixin, atomic saves, the one
upload path) and ``modeling`` (:class:`SDMHead`, delegating to the others).

The names below are imported on first use, so that :mod:`sdm_hf.head.serialization` can import
``sdm_hf.head.config`` and ``sdm_hf.head.state`` without importing the head class (which
itself saves through persistence): the dependency runs one way.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import SDMConfig
    from .diagnostics import CalibrationReport, LabelErrors
    from .inference import SDMOutput
    from .modeling import SDMHead
    from .state import CalibrationState, SDMHeadState, SupportState
    from .support import SupportSet

_WHERE = {
    "SDMConfig": ".config",
    "SDMHead": ".modeling",
    "SDMOutput": ".inference",
    "CalibrationReport": ".diagnostics",
    "LabelErrors": ".diagnostics",
    "CalibrationState": ".state",
    "SDMHeadState": ".state",
    "SupportState": ".state",
    "SupportSet": ".support",
}

__all__ = [
    "CalibrationReport",
    "CalibrationState",
    "LabelErrors",
    "SDMConfig",
    "SDMHead",
    "SDMHeadState",
    "SDMOutput",
    "SupportSet",
    "SupportState",
]


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
