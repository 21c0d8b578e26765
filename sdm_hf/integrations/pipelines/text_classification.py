"""``pipeline("sdm-text-classification")``: an SDM head over pooled features of an encoder."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from ...features.extract import extract_features
from ...repository import check_pairing
from .common import ACCEPTED, Numbered, SDMPipeline, as_columns, describe, first_row
from .records import text_result

__all__ = ["SDMTextClassificationPipeline"]


class SDMTextClassificationPipeline(SDMPipeline):
    """Text classification with an SDM head over pooled features of an encoder (or any model).

    Example::

        clf = pipeline("sdm-text-classification", model="path/to/model-with-sdm_head")  # after import sdm_hf
        clf("Paris is a name of a city.")
        # {'label': 'true', 'score': 0.97, 'high_reliability': True, 'high_reliability_lower': True,
        #  'is_ood': False, 'q': 41, 'd': 0.62, 'rescaled_similarity': 2.9, 'truncated': False,
        #  'nearest_exemplar': {'index': 12, 'id': ..., 'label': 'true', 'text': ...}}

    Input: a string, or a list / ``datasets`` column / ``KeyDataset`` / generator of strings (``[]`` gives
    ``[]``); with ``text_column=``, rows (dicts), a ``datasets.Dataset`` or a streaming ``IterableDataset``.
    ``batch_size`` (default 8) texts run together; a list's texts are batched by token count.

    Output per input: ``label`` (``id2label`` name), ``score`` (its SDM probability), ``high_reliability``,
    ``high_reliability_lower``, ``is_ood``, ``q``, ``d``, ``rescaled_similarity``, ``truncated`` (cut to the
    recipe's max length; also warned) and ``nearest_exemplar``. Features follow the head's recorded recipe and
    equal :func:`~sdm_hf.features.extract.extract_features` of the texts up to float rounding.

    Construction: ``sdm_head`` (SDMHead, folder or Hub repo id; default: the model repository's ``sdm_head/``
    at the same revision), ``head_subfolder``, ``sdm_head_kwargs`` (``revision``, ``token``, ``cache_dir``,
    ``local_files_only``, ``force_download``).

    Raises:
        ValueError: the head reads features composed from several models, or its width differs from the
            model's (a head from another model only warns).
        TypeError: (per call) a non-string input, naming its index.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # raises for features composed from several models; warns for a head from elsewhere
        check_pairing(self.model, self.sdm_head, same_repository=self.head_from_model_repository)
        recipe: Any = self.sdm_head.config.feature_recipe
        limit: Any = recipe.max_length or getattr(self.tokenizer, "model_max_length", 512)
        self.max_length = int(limit)
        self.pooling = recipe.pooling or "mean"
        self.layer = -1 if recipe.layer is None else recipe.layer

    def __call__(self, inputs: Any, text_column: str | None = None, **kwargs: Any) -> Any:
        """Results for ``inputs`` (see the class docstring); ``text_column``: the column of rows (dicts, a
        ``datasets.Dataset`` or streaming ``IterableDataset``) that holds the texts."""
        if text_column is not None:
            inputs = select_column(inputs, text_column)
        return super().__call__(inputs, **kwargs)

    def check_input(self, item: Numbered) -> None:
        if not isinstance(item.value, str):
            hint = " (rows of a dataset: pass text_column='<column>')" if isinstance(item.value, Mapping) else ""
            raise TypeError(
                f"{item.where} is {describe(item.value)}; the {self._name} pipeline takes texts: "
                f"pass {ACCEPTED} of strings{hint}"
            )

    def _lengths(self, values: list) -> list[int]:
        """Token counts of a list's texts, so that batches pad less."""
        tokenizer: Any = self.tokenizer
        return [len(ids) for ids in tokenizer(values, truncation=False)["input_ids"]]

    def _sanitize_parameters(self, **kwargs: Any):
        self._check_options(kwargs)
        return {}, {}, {}

    def preprocess(self, inputs: Any, **_: Any) -> dict[str, Any]:
        """One text -> ``{"index", "text", "truncated"}`` (longer than the recipe's max length in tokens)."""
        item = inputs if isinstance(inputs, Numbered) else Numbered(None, inputs)
        self.check_input(item)
        tokenizer: Any = self.tokenizer  # set: the base class refuses a pipeline without one
        length = len(tokenizer(item.value, truncation=False)["input_ids"])
        return {"index": item.index, "text": item.value, "truncated": length > self.max_length}

    def _forward(self, model_inputs: dict[str, Any], **_: Any) -> dict[str, list]:
        """B texts -> columns of B values: ``(B, D)`` features of the batch, then one ``predict``."""
        cols = as_columns(model_inputs)
        with warnings.catch_warnings():  # reported per input ('truncated') and once in postprocess
            warnings.filterwarnings("ignore", message=".*texts were longer than max_length", category=UserWarning)
            feats = extract_features(
                self.model,
                self.tokenizer,
                cols["text"],
                pooling=self.pooling,
                layer=self.layer,
                batch_size=len(cols["text"]),
                max_length=self.max_length,
                progress=False,
            )
        records = self.sdm_head.predict(feats).to_list(self.sdm_head.config.id2label)
        return {"index": cols["index"], "record": records, "truncated": cols["truncated"]}

    def postprocess(self, model_outputs: dict[str, Any], **_: Any) -> dict[str, Any]:
        """One input's record -> its result dict."""
        row = first_row(model_outputs)
        record = row["record"]
        if row["truncated"]:
            warnings.warn(
                f"a text longer than max_length={self.max_length} tokens was truncated (see its 'truncated' field)",
                UserWarning,
                stacklevel=2,
            )
        return text_result(record, bool(row["truncated"]), self._nearest(record["nearest_index"]))


def select_column(inputs: Any, column: str) -> Any:
    """The ``column`` of rows: of a ``datasets.Dataset`` a list, of one dict its value, of a list of rows a
    list, of another iterable of rows (streaming ``IterableDataset``, generator) a generator.

    Raises:
        TypeError: ``column`` is not a string, or a row is not a dict.
        ValueError: a missing column, naming the row.
    """
    if not isinstance(column, str):
        raise TypeError(f"text_column must be a column name, got {type(column).__name__}")
    names = getattr(inputs, "column_names", None)
    if names is not None and hasattr(inputs, "__getitem__") and hasattr(inputs, "__len__"):
        if column not in names:
            raise ValueError(f"text_column={column!r} is not a column of the dataset (columns: {names})")
        return inputs[column]
    if isinstance(inputs, Mapping):
        return _value(inputs, column, None)
    if isinstance(inputs, (list, tuple)):
        return [_value(row, column, i) for i, row in enumerate(inputs)]
    if isinstance(inputs, Iterable) and not isinstance(inputs, (str, bytes)):
        return (_value(row, column, i) for i, row in enumerate(inputs))
    raise TypeError(f"text_column={column!r} needs rows (dicts) or a dataset, got {type(inputs).__name__}")


def _value(row: Any, column: str, index: int | None) -> Any:
    where = "the input" if index is None else f"input {index}"
    if not isinstance(row, Mapping):
        raise TypeError(f"{where} is {describe(row)}, not a row: text_column= needs rows (dicts) or a dataset")
    if column not in row:
        raise ValueError(f"{where} has no column {column!r} (it has {sorted(row)})")
    return row[column]
