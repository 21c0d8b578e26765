"""Small file-system helpers shared by the recipes and the command line."""

from __future__ import annotations

import shutil
from pathlib import Path


def prepare_output_dir(path, overwrite: bool) -> Path:
    """Create ``path`` for fresh results; an existing non-empty folder is replaced only with
    ``overwrite`` (results are never silently overwritten).

    Raises:
        FileExistsError: the folder exists, is not empty and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output folder {path} exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path
