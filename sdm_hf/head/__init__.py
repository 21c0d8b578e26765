"""The SDM estimator over frozen features: :class:`SDMConfig`, :class:`SDMHead`, :class:`SDMOutput` and their state.

Names are imported on first use, so that :mod:`sdm_hf.head.serialization` can import ``config`` and
``state`` without importing the head class.
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
