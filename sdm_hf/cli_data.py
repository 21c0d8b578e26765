"""Reading the ``sdm-hf`` command's data files: tables, vector columns and label columns, with
errors that name the file and line (:class:`CLIError`: one line on stderr, exit code 2)."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import numpy as np
import torch

__all__ = ["CLIError", "load_table", "check_utf8", "column", "vectors_of", "labels_of", "label_names_in"]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def load_table(paths: list[str]):
    """Rows of one or more data files (JSON lines, JSON, CSV, parquet) or a saved ``datasets`` folder as a
    Dataset; CLIError naming the file (and line where it can) otherwise."""
    import datasets

    for path in paths:
        if not Path(path).exists():
            raise CLIError(f"no such file or folder: {path}")
        if Path(path).is_file() and Path(path).stat().st_size < 65536 and not Path(path).read_bytes().strip():
            raise CLIError(f"{path}: the file is empty (no rows)")
    if len(paths) == 1 and Path(paths[0]).is_dir():
        try:
            data = datasets.load_from_disk(paths[0])
        except Exception as err:  # noqa: BLE001 - datasets raises several types here
            raise CLIError(f"{paths[0]}: not a saved datasets folder ({err})") from None
        return data["train"] if isinstance(data, datasets.DatasetDict) else data
    suffixes = {Path(p).suffix.lower() for p in paths}
    kinds = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
    if len(suffixes) != 1 or next(iter(suffixes)) not in kinds:
        raise CLIError(f"data files must all be one of {sorted(kinds)}; got {sorted(suffixes)}")
    kind = suffixes.pop()
    if kind in (".jsonl", ".json", ".csv"):
        for path in paths:
            check_utf8(path)  # the readers would replace bad bytes silently or fail without a line
    try:
        return datasets.load_dataset(kinds[kind], data_files=list(paths), split="train")
    except Exception as err:  # noqa: BLE001 - arrow/json parse errors come in many types
        for path in paths:  # name the first bad line where we can find it
            _check_json_lines(path)
        raise CLIError(f"could not read {', '.join(paths)}: {type(err).__name__}: {err}".splitlines()[0]) from None


def check_utf8(path: str, chunk: int = 1 << 24) -> None:
    """Raise naming ``path:line:column`` of the first byte that is not UTF-8 (the file is read
    in 16 MiB chunks; only a bad file is read again line by line to find the place)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                decoder.decode(block)
        decoder.decode(b"", final=True)
        return
    except UnicodeDecodeError:
        pass
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise CLIError(
                    f"{path}:{number}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                    "save the file as UTF-8"
                ) from None


def _check_json_lines(path: str) -> None:
    """Raise naming ``path:line`` of the first line of a JSON-lines file that is not a JSON object."""
    if Path(path).suffix.lower() != ".jsonl":
        return
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):  # only after the fast reader failed
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise CLIError(f"{path}:{number}: not valid JSON ({err})") from None
            if not isinstance(row, dict):
                raise CLIError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")


def column(data, name: str, paths) -> list:
    """Column ``name`` of ``data``; CLIError listing the columns when it has none."""
    if name not in data.column_names:
        raise CLIError(f"{', '.join(paths)}: no column {name!r} (columns: {data.column_names})")
    return data[name]


def vectors_of(data, name: str, paths) -> torch.Tensor:
    """The ``[N, D]`` float32 features of a vector column; an error names the file and line of
    the first row that is not a list of D numbers."""
    values = column(data, name, paths)
    widths = [len(v) if isinstance(v, (list, tuple, np.ndarray)) else None for v in values]
    expected = next((w for w in widths if w), None)
    for index, (value, width) in enumerate(zip(values, widths)):
        if width is None or width == 0 or width != expected:
            found = describe_cell(value) if width is None else f"a list of {width} values (row 1 has {expected})"
            raise CLIError(
                f"{_row(paths, index)}: column {name!r} must hold equal-length lists of numbers, found {found}"
            )
    try:
        return torch.tensor(np.asarray([np.asarray(v, dtype=np.float32) for v in values]), dtype=torch.float32)
    except (ValueError, TypeError) as err:
        raise CLIError(f"column {name!r} must hold lists of numbers ({err})") from None


def describe_cell(value) -> str:
    """A cell's type and repr, cut to 80 characters (for error messages)."""
    return f"{type(value).__name__} {value!r}"[:80]


def _row(paths, index: int) -> str:
    """Where data row ``index`` (0-based) is: the file, and the line for CSV (after the header)
    and JSON lines; for several files or a datasets folder, the row number."""
    if len(paths) == 1 and Path(paths[0]).suffix.lower() in (".csv", ".jsonl"):
        line = index + (2 if Path(paths[0]).suffix.lower() == ".csv" else 1)
        return f"{paths[0]}:{line}"
    return f"{', '.join(paths)}: row {index + 1}"


def _show(value) -> str:
    """``repr`` of a numpy scalar as the Python value it holds (``'x'``, not ``np.str_('x')``)."""
    return repr(value.item() if hasattr(value, "item") else value)


def label_names_in(data, args, paths) -> list[str] | None:
    """The label names in the label column, or None when it holds class indices (integers,
    integral numbers or digit strings)."""
    values = np.asarray(column(data, args.label_column, paths))
    if values.dtype.kind != "U":
        return None
    stripped = np.char.strip(values)
    if bool(np.char.isdigit(stripped).all()):
        return None
    return sorted(set(stripped.tolist()))


def labels_of(data, args, paths, num_classes=None, why_classes: str = "", label2id=None) -> torch.Tensor:
    """The label column as int64 class indices; an error names the file and line.

    Integers (or integral numbers, or digit strings) are class indices; names (strings) are
    mapped with ``label2id``, and a name not in it is refused.
    """
    values = np.asarray(column(data, args.label_column, paths))
    name = args.label_column
    if values.dtype.kind in "iu":
        y = torch.from_numpy(values.astype(np.int64))
    elif values.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
        if bad.size:
            raise CLIError(
                f"{_row(paths, int(bad[0]))}: label {_show(values[bad[0]])} in column {name!r} "
                "is not an integer class index"
            )
        y = torch.from_numpy(values.astype(np.int64))
    elif values.dtype.kind == "U":
        stripped = np.char.strip(values)
        digits = np.char.isdigit(stripped)
        if bool(digits.all()):
            y = torch.from_numpy(stripped.astype(np.int64))
        elif label2id is not None:
            known = np.isin(stripped, list(label2id))
            if not bool(known.all()):
                unknown = int(np.flatnonzero(~known)[0])
                raise CLIError(
                    f"{_row(paths, unknown)}: label {_show(stripped[unknown])} in column {name!r} is not one of "
                    f"the classes {sorted(label2id)}"
                )
            lookup = np.array(sorted(label2id), dtype=stripped.dtype)
            ids = np.array([label2id[n] for n in lookup.tolist()], dtype=np.int64)
            y = torch.from_numpy(ids[np.searchsorted(lookup, stripped)])
        else:
            first = int(np.flatnonzero(~digits)[0])
            raise CLIError(
                f"{_row(paths, first)}: label {_show(values[first])} in column {name!r} is a name, but these "
                "labels are class indices (mixing names and indices is not allowed)"
            )
    else:
        raise CLIError(
            f"column {name!r} must hold class indices or names (found {values.dtype} values, e.g. empty cells)"
        )
    if num_classes is not None and len(y):
        bad = np.flatnonzero((y.numpy() < 0) | (y.numpy() >= num_classes))
        if bad.size:
            raise CLIError(
                f"{_row(paths, int(bad[0]))}: label {int(y[bad[0]])} is outside 0..{num_classes - 1}{why_classes}"
            )
    return y
