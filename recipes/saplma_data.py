"""Load the shipped SAPLMA true/false statements (data/saplma) as `datasets.Dataset`s.

Used by the recipes, benchmarks and tests; see data/README.md for the source and licence.
Lines are parsed one by one so that a bad line is reported with its file and line number.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from datasets import Dataset, concatenate_datasets

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "saplma"
TRAIN_TOPICS = ("cities", "elements", "facts")
CALIBRATION_TOPICS = ("inventions", "companies", "animals")
SHIFTED_TOPICS = ("generated",)
ID2LABEL = {0: "false", 1: "true"}
ATTRIBUTE_DIM = 32


def read_statements(path) -> Dataset:
    """One topic file -> Dataset with columns id, label, document, attributes.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: a line is not JSON or lacks a field; the message names file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing data file {path}; see data/README.md")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                record = {
                    "id": str(row["id"]),
                    "label": int(row["label"]),
                    "document": str(row["document"]),
                    "attributes": [float(v) for v in row["attributes"]],
                }
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{number}: bad line ({type(err).__name__}: {err})") from None
            if record["label"] not in (0, 1) or len(record["attributes"]) != ATTRIBUTE_DIM:
                raise ValueError(f"{path}:{number}: label must be 0/1 and attributes {ATTRIBUTE_DIM} numbers")
            rows.append(record)
    return Dataset.from_list(rows)


def load_topics(topics, data_dir=DATA_DIR) -> Dataset:
    """The statements of the given topic files as one Dataset (with a `topic` column)."""
    parts = []
    for topic in topics:
        part = read_statements(Path(data_dir) / f"{topic}_true_false.csv.attributes.jsonl")
        parts.append(part.add_column("topic", [topic] * len(part)))
    return concatenate_datasets(parts)


def as_arrays(dataset) -> tuple[np.ndarray, np.ndarray]:
    """`(attributes [N, 32] float32, labels [N] int64)` of a loaded split."""
    return (
        np.asarray(dataset["attributes"], dtype=np.float32),
        np.asarray(dataset["label"], dtype=np.int64),
    )
