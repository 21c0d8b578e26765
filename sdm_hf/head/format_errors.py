"""The one error a stored SDM head raises when it cannot be loaded as it is."""

from __future__ import annotations

__all__ = ["SDMFormatError"]


class SDMFormatError(ValueError):
    """A stored SDM head is missing, corrupted, inconsistent or of another format version.

    The message is ``"<path>: <problem>"``; both are kept as attributes (``path`` as a string).
    """

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem
