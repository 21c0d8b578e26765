"""sdm_hf's loggers, with transformers' verbosity conventions.

Every module logs to ``logging.getLogger(__name__)`` under the library logger ``"sdm_hf"``, which
has its own stderr handler and does not propagate (as transformers' library logger). Its level
comes from the ``SDM_HF_VERBOSITY`` environment variable (``debug``, ``info``, ``warning`` (the
default), ``error``, ``critical``) or :func:`set_verbosity`. Runtime events a user cannot act on
in code (a corrupt cache entry recomputed, a conversion redone) are logged; what the caller
should change (an empty HR region, a truncated text) is a ``warnings.warn``.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = [
    "LIBRARY_LOGGER",
    "get_logger",
    "get_verbosity",
    "set_verbosity",
    "set_verbosity_debug",
    "set_verbosity_info",
    "set_verbosity_warning",
    "set_verbosity_error",
    "enable_propagation",
    "disable_propagation",
]

LIBRARY_LOGGER = "sdm_hf"
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def _configure() -> logging.Logger:
    root = logging.getLogger(LIBRARY_LOGGER)
    if getattr(root, "_sdm_hf_configured", False):
        return root
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(name)s] %(levelname)s: %(message)s"))
    root.addHandler(handler)
    root.propagate = False
    requested = os.environ.get("SDM_HF_VERBOSITY", "").strip().lower()
    root.setLevel(LEVELS.get(requested, logging.WARNING))
    if requested and requested not in LEVELS:
        root.warning("unknown SDM_HF_VERBOSITY=%r; use one of %s", requested, ", ".join(LEVELS))
    root._sdm_hf_configured = True  # type: ignore[attr-defined]
    return root


def get_logger(name: str = LIBRARY_LOGGER) -> logging.Logger:
    """The logger ``name`` (a module's ``__name__``), the library logger configured first."""
    _configure()
    return logging.getLogger(name)


def get_verbosity() -> int:
    """The library logger's level (``logging.WARNING`` unless changed)."""
    return _configure().getEffectiveLevel()


def set_verbosity(level: int) -> None:
    """Set the library logger's level (``logging.INFO`` shows each SDMTrainer epoch refresh)."""
    _configure().setLevel(level)


def set_verbosity_debug() -> None:
    """Level DEBUG."""
    set_verbosity(logging.DEBUG)


def set_verbosity_info() -> None:
    """Level INFO."""
    set_verbosity(logging.INFO)


def set_verbosity_warning() -> None:
    """Level WARNING (the default)."""
    set_verbosity(logging.WARNING)


def set_verbosity_error() -> None:
    """Level ERROR."""
    set_verbosity(logging.ERROR)


def enable_propagation() -> None:
    """Let records reach the root logger too (e.g. an application's own handlers, pytest's caplog)."""
    _configure().propagate = True


def disable_propagation() -> None:
    """Keep records to the library's own handler (the default)."""
    _configure().propagate = False
