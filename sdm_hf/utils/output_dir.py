"""Output folders for the command line and the recipes: nothing a user needs is ever deleted.

A marker file (``.sdm_hf_output.json``) lists what sdm_hf wrote; ``--overwrite`` replaces only a folder
that holds nothing else and none of the command's inputs (rules: docs/serving.md, section 'How saves
stay safe').
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

MARKER = ".sdm_hf_output.json"
_STAGE_TAG = ".sdm_hf-new-"
_OLD_TAG = ".sdm_hf-old-"


def _files_below(folder: Path) -> list[str]:
    """Every file under ``folder`` as a sorted list of POSIX paths relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def _read_marker(folder: Path) -> dict:
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise FileExistsError(
            f"{folder / MARKER} cannot be read ({err}); empty or remove the folder yourself"
        ) from None
    if not isinstance(marker, dict):
        raise FileExistsError(f"{folder / MARKER} is not an sdm_hf marker; empty or remove the folder yourself")
    return marker


def _unknown_files(folder: Path) -> list[str]:
    """Files in a marked folder that sdm_hf did not write (sealed marker: not in ``files``; unsealed: in
    ``not_ours``)."""
    marker = _read_marker(folder)
    present = [name for name in _files_below(folder) if name != MARKER]
    if marker.get("files") is not None:
        known = set(marker["files"])
        return [name for name in present if name not in known]
    foreign = set(marker.get("not_ours") or ())
    return [name for name in present if name in foreign]


def check_output_dir(path, overwrite: bool, inputs: Iterable = ()) -> Path:
    """Raise now, before any long work, if the output folder would be refused; changes nothing.

    Args:
        overwrite: whether an existing folder written by sdm_hf may be replaced.
        inputs: the command's own input files or folders (those absent here, e.g. Hub ids, are skipped).

    Returns:
        ``Path(path)``.

    Raises:
        FileExistsError: ``path`` is a file; or it is a non-empty folder that ``overwrite`` is False for,
            that has no sdm_hf marker or that holds files sdm_hf did not write; or an input is or lies in it.
    """
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
        unknown = _unknown_files(path)
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise FileExistsError(
                f"output folder {path} holds files sdm_hf did not write ({shown}); --overwrite would delete "
                "them: move them out or choose another output folder"
            )
    return path


def _write_marker(folder: Path, program: str, files: list[str] | None, not_ours: list[str] | None = None) -> None:
    payload: dict = {"written_by": "sdm_hf", "program": program}
    if files is not None:
        payload["files"] = files
    if not_ours:
        payload["not_ours"] = not_ours
    (folder / MARKER).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


def seal_output_dir(path, program: str = "sdm_hf") -> None:
    """Record every file now in ``path``, except those already foreign, as sdm_hf's (call when a run is done)."""
    path = Path(path)
    foreign = set(_unknown_files(path)) if (path / MARKER).is_file() else set()
    _write_marker(path, program, [name for name in _files_below(path) if name != MARKER and name not in foreign])


def unseal_output_dir(path, program: str = "sdm_hf") -> None:
    """Mark ``path`` as a run in progress: files added count as sdm_hf's; foreign ones (all of an unmarked
    folder) stay foreign."""
    path = Path(path)
    foreign = _unknown_files(path) if (path / MARKER).is_file() else _files_below(path)
    _write_marker(path, program, None, foreign)


def prepare_output_dir(path, overwrite: bool, program: str = "sdm_hf", inputs: Iterable = ()) -> Path:
    """Create (emptying it if allowed) ``path`` for results written in place, marked as a run in progress.

    For a long or resumable run; call :func:`seal_output_dir` at its end. Otherwise prefer
    :func:`replacing_output_dir`, which keeps the old folder until the new one is complete.

    Raises:
        FileExistsError: as :func:`check_output_dir`.
    """
    path = check_output_dir(path, overwrite, inputs)
    if path.exists() and any(path.iterdir()):
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    unseal_output_dir(path, program)
    return path


def _remove_leftovers(path: Path) -> None:
    """Delete what a killed :func:`replacing_output_dir` left beside ``path`` (an old copy goes back if it is gone)."""
    parent = path.parent
    if not parent.is_dir():
        return
    for leftover in parent.glob(f".{path.name}{_STAGE_TAG}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in sorted(parent.glob(f".{path.name}{_OLD_TAG}*")):
        if not path.exists():
            os.replace(leftover, path)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def replacing_output_dir(path, overwrite: bool, program: str = "sdm_hf", inputs: Iterable = ()) -> Iterator[Path]:
    """Write results into a fresh folder beside ``path`` and swap it in when the block succeeds.

    Usage::

        with replacing_output_dir("out", overwrite=True, program="fit-head") as folder:
            head.save_pretrained(folder)  # had the block raised, "out" would be unchanged

    The rules of :func:`check_output_dir` are checked before and again just before the swap (two renames;
    ``path`` is absent between them).

    Yields:
        The staging folder (``.<name>.sdm_hf-new-<random>`` beside ``path``).

    Raises:
        FileExistsError: as :func:`check_output_dir`.
        Whatever the block raises (``OSError`` for a full disk), after deleting the staging folder.
    """
    _remove_leftovers(Path(path))
    path = check_output_dir(path, overwrite, inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = path.parent / f".{path.name}{_STAGE_TAG}{secrets.token_hex(4)}"
    stage.mkdir()
    try:
        yield stage
        seal_output_dir(stage, program)
        check_output_dir(path, overwrite, inputs)  # nothing was added to the old folder meanwhile
        old = None
        if path.exists():
            old = path.parent / f".{path.name}{_OLD_TAG}{secrets.token_hex(4)}"
            os.replace(path, old)
        try:
            os.replace(stage, path)
        except OSError:
            if old is not None:
                os.replace(old, path)
            raise
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
