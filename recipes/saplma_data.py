"""Load the shipped SAPLMA true/false statements (data/saplma) with `datasets`.

Used by the recipes and benchmarks; see data/README.md for the source and licence.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from datasets import concatenate_datasets, load_dataset

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "saplma"
TRAIN_TOPICS = ("cities", "elements", "facts")
CALIBRATION_TOPICS = ("inventions", "companies", "animals")
SHIFTED_TOPICS = ("generated",)
ID2LABEL = {0: "false", 1: "true"}


def load_topics(topics) -> datasets.Dataset:  # noqa: F821
    """The statements of the given topic files as one `datasets.Dataset` (with a `topic`
    column), in file order."""
    parts = []
    for topic in topics:
        path = DATA_DIR / f"{topic}_true_false.csv.attributes.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"missing data file {path}; see data/README.md")
        part = load_dataset("json", data_files=str(path), split="train")
        parts.append(part.add_column("topic", [topic] * len(part)))
    return concatenate_datasets(parts)


def as_arrays(dataset) -> tuple[np.ndarray, np.ndarray]:
    """`(attributes [N, 32] float32, labels [N] int64)` of a loaded split."""
    return (
        np.asarray(dataset["attributes"], dtype=np.float32),
        np.asarray(dataset["label"], dtype=np.int64),
    )
