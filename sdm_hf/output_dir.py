"""Small file-system helpers shared by the recipes and the command line."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

MARKER = ".sdm_hf_output.json"


def check_output_dir(path, overwrite: bool, inputs: Iterable = ()) -> Path:
    """Raise now (before any long work) if :func:`prepare_output_dir` would refuse ``path``;
    changes nothing on disk. ``inputs``: the command's own input files or folders, which must
    not be the output folder or lie inside it (replacing the folder would delete them)."""
    path = Path(path)
    target = path.resolve()
    for item in inputs:
        if not Path(item).exists():  # e.g. a Hub id: nothing on this disk to protect
            continue
        source = Path(item).resolve()
        if source == target or target in source.parents:
            raise FileExistsError(
                f"{item} is an input of this command and lies in the output folder {path}: writing the results "
                "there would replace it; choose another output folder"
            )
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output path {path} exists and is a file, not a folder; choose another output")
    if path.exists() and any(path.iterdir()):
        if not (path / MARKER).is_file():
            raise FileExistsError(
                f"output folder {path} exists, is not empty and was not written by sdm_hf (no {MARKER}); "
                "refusing to touch it: choose another output folder or empty it yourself"
            )
        if not overwrite:
            raise FileExistsError(f"output folder {path} exists and is not empty; pass --overwrite to replace it")
    return path


def prepare_output_dir(path, overwrite: bool, program: str = "sdm_hf", inputs: Iterable = ()) -> Path:
    """Create ``path`` for fresh results and mark it as ours.

    An existing non-empty folder is replaced only with ``overwrite`` AND only when it carries
    the marker file (``.sdm_hf_output.json``) that this function writes: a folder written by
    another program (or by hand) is never deleted, whatever ``overwrite`` says.

    Args:
        path: the output folder.
        overwrite: replace an existing folder that sdm_hf wrote.
        program: recorded in the marker (which command wrote the folder).
        inputs: the command's own inputs; refused when they are or lie in ``path``.

    Raises:
        FileExistsError: the folder exists, is not empty, and ``overwrite`` is False or the
            folder was not written by sdm_hf; or an input is or lies in the folder.
    """
    path = check_output_dir(path, overwrite, inputs)
    if path.exists() and any(path.iterdir()):
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text(json.dumps({"written_by": "sdm_hf", "program": program}) + "\n", encoding="utf-8")
    return path
