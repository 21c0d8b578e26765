"""What both SDM pipelines share: where the head comes from, numbered inputs, batch columns.

Inputs reach ``preprocess`` wrapped in :class:`Numbered` so that an error names the input's index,
even for a generator or a ``KeyDataset`` (design: docs/serving.md, section 'Design notes: pipelines and processes').
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, IterableDataset
from transformers import Pipeline

from ...head.modeling import SDMHead
from ...repository import DEFAULT_HEAD_SUBFOLDER
from .records import nearest_exemplar, tiers

__all__ = [
    "ACCEPTED",
    "HUB_OPTIONS",
    "Numbered",
    "NumberedDataset",
    "SDMPipeline",
    "as_columns",
    "describe",
    "first_row",
    "is_chat",
    "number_inputs",
    "pipeline_call_hub_options",
    "resolve_head",
    "tiers",
]

#: Keyword arguments of :meth:`SDMHead.from_pretrained` that ``sdm_head_kwargs`` may set.
HUB_OPTIONS = ("revision", "token", "cache_dir", "local_files_only", "force_download")

#: What a pipeline call takes, for error messages.
ACCEPTED = (
    "a string, a list of them, a datasets column (dataset['text']), "
    "transformers.pipelines.pt_utils.KeyDataset(dataset, 'text') or a generator"
)


@dataclass(frozen=True)
class Numbered:
    """One pipeline input and its position in the call (``index`` is None for a single input)."""

    index: int | None
    value: Any

    @property
    def where(self) -> str:
        """``"input 3"`` (or ``"the input"`` for a single input), for error messages."""
        return "the input" if self.index is None else f"input {self.index}"


class NumberedDataset(Dataset):
    """A lazy view of a map-style dataset (e.g. ``KeyDataset``) whose items come as :class:`Numbered`."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Numbered:
        return Numbered(i, self.dataset[i])


def _numbered_stream(items: Iterable) -> Iterator[Numbered]:
    for i, item in enumerate(items):
        yield Numbered(i, item)


def describe(value: Any) -> str:
    """``"None"`` or ``"of type int"``, for error messages."""
    return "None" if value is None else f"of type {type(value).__name__}"


def is_chat(value: Any) -> bool:
    """Whether ``value`` is a conversation: a non-empty list of ``{"role", "content"}`` dicts."""
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value)
    )


def number_inputs(inputs: Any, chats: bool) -> tuple[Any, bool]:
    """``(what to hand to Pipeline.__call__, whether it is a list)`` for ``inputs``.

    A list, tuple or other sized sequence (``datasets`` column or rows, numpy array) -> a list of
    :class:`Numbered` (but chat messages are ONE conversation when ``chats``); an iterator, torch
    ``IterableDataset`` or unsized iterable -> a generator of :class:`Numbered`; a map-style torch
    ``Dataset`` -> :class:`NumberedDataset`; anything else (str, dict, None, ...) -> ``Numbered(None, inputs)``.
    """
    if inputs is None or isinstance(inputs, (str, bytes, Mapping)):
        return Numbered(None, inputs), False
    if isinstance(inputs, (list, tuple)):
        if chats and is_chat(inputs):
            return Numbered(None, list(inputs)), False
        return [Numbered(i, x) for i, x in enumerate(inputs)], True
    if isinstance(inputs, (Iterator, IterableDataset)):
        return _numbered_stream(inputs), False
    if isinstance(inputs, Dataset):
        return NumberedDataset(inputs), False
    if hasattr(inputs, "__len__") and hasattr(inputs, "__getitem__") and isinstance(inputs, Iterable):
        return [Numbered(i, x) for i, x in enumerate(inputs)], True
    if isinstance(inputs, Iterable):  # e.g. a streaming datasets.IterableDataset
        return _numbered_stream(inputs), False
    return Numbered(None, inputs), False


def as_columns(model_inputs: dict[str, Any]) -> dict[str, list]:
    """One batch's inputs as equal-length columns ``{key: [value per item]}``.

    transformers collates only when ``batch_size > 1``; a list under ``"index"`` tells the two apart.
    """
    if isinstance(model_inputs["index"], list):
        return model_inputs
    return {key: [value] for key, value in model_inputs.items()}


def first_row(model_outputs: dict[str, Any]) -> dict[str, Any]:
    """One input's outputs from ``_forward``'s columns (unbatched by transformers only when ``batch_size > 1``)."""
    if isinstance(model_outputs["index"], list):
        return {key: value[0] for key, value in model_outputs.items()}
    return model_outputs


def pipeline_call_hub_options() -> dict[str, Any]:
    """``revision``, ``token``, ``cache_dir`` and ``local_files_only`` of the ``transformers.pipeline(...)``
    call constructing a pipeline now, read from its frame (``{}`` when constructed directly or not found).

    Why: ``pipeline()`` keeps these to itself, yet the head must come from the model's revision (for a PEFT
    adapter: the revision requested of the adapter repository).
    """
    try:
        from transformers.pipelines import pipeline as factory
    except ImportError:  # pragma: no cover - transformers without pipelines
        return {}
    code = getattr(inspect.unwrap(factory), "__code__", None)
    frame = inspect.currentframe()
    try:
        while frame is not None and frame.f_code is not code:
            frame = frame.f_back
        if frame is None:
            return {}
        local = frame.f_locals
        hub = local.get("hub_kwargs")
        if not isinstance(hub, dict):
            return {}
        from_adapter = local.get("adapter_path") is not None
        model_kwargs = local.get("model_kwargs") or {}
        options = {
            "revision": local.get("requested_revision") if from_adapter else hub.get("revision"),
            "token": hub.get("token"),
            "cache_dir": model_kwargs.get("cache_dir") if isinstance(model_kwargs, dict) else None,
            "local_files_only": True if hub.get("local_files_only") else None,
        }
        return {key: value for key, value in options.items() if value is not None}
    finally:
        del frame  # frames hold their callers' locals: do not keep them alive


def resolve_head(
    sdm_head: SDMHead | str | Path | None,
    model: Any,
    subfolder: str,
    call_options: dict[str, Any],
    sdm_head_kwargs: Mapping[str, Any] | None,
) -> SDMHead:
    """The pipeline's head: ``sdm_head`` itself, the folder or Hub repo it names, or (None) the
    ``subfolder`` of the model's repository (``model.config._name_or_path``).

    Args:
        call_options: :func:`pipeline_call_hub_options`; its revision applies to the model's repository only.
        sdm_head_kwargs: explicit :data:`HUB_OPTIONS`, overriding ``call_options``.

    Raises:
        TypeError: ``sdm_head`` is of another type.
        ValueError: unknown ``sdm_head_kwargs``; the model has no repository path; a local folder has no
            head ``config.json`` (in ``subfolder`` for the model's repository).
        SDMFormatError: from :meth:`SDMHead.from_pretrained`.
    """
    if isinstance(sdm_head, SDMHead):
        return sdm_head
    if sdm_head is not None and not isinstance(sdm_head, (str, Path)):
        raise TypeError(f"sdm_head must be an SDMHead, a folder or a Hub repo id, got {type(sdm_head).__name__}")
    explicit = dict(sdm_head_kwargs or {})
    unknown = sorted(set(explicit) - set(HUB_OPTIONS))
    if unknown:
        raise ValueError(f"unknown sdm_head_kwargs {unknown}; valid keys: {list(HUB_OPTIONS)}")
    options = dict(call_options)
    if sdm_head is None:
        source = getattr(getattr(model, "config", None), "_name_or_path", None)
        sub: str | None = subfolder
        if not source:
            raise ValueError(
                "no SDM head: the model has no repository path to look for a "
                f"'{subfolder}/' subfolder in; pass sdm_head=<SDMHead, folder or repo id>"
            )
    else:
        source, sub = sdm_head, None
        options.pop("revision", None)  # the model's revision means nothing in another repository
    options.update(explicit)
    root = Path(str(source)).expanduser()
    local = root / (sub or "")
    if root.is_dir() and not (local / "config.json").is_file():
        raise ValueError(
            f"{source} has no SDM head in '{sub}/' (no {local / 'config.json'}); pass sdm_head=<SDMHead, "
            "folder or repo id>, e.g. for a PEFT adapter repository"
        )
    return SDMHead.from_pretrained(str(source), subfolder=sub, **options)


class SDMPipeline(Pipeline):
    """Base of the SDM pipelines (transformers' ``preprocess`` / ``_forward`` / ``postprocess`` contract).

    ``__call__`` numbers the inputs, checks a list before any model work and may order it longest first
    (results keep the input order); batching (``batch_size``, default 8), streaming and ``num_workers``
    are ``Pipeline.__call__``'s.

    Raises:
        ValueError: the model has no tokenizer; as :func:`resolve_head`.
    """

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True
    _options: tuple[str, ...] = ()
    _accepts_chats = False
    default_batch_size = 8

    def __init__(
        self,
        *args: Any,
        sdm_head: SDMHead | str | Path | None = None,
        head_subfolder: str = DEFAULT_HEAD_SUBFOLDER,
        sdm_head_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ):
        call_options = pipeline_call_hub_options()
        if kwargs.pop("local_files_only", False):  # transformers.pipeline() hands this one on
            call_options["local_files_only"] = True
        kwargs.setdefault("batch_size", self.default_batch_size)
        super().__init__(*args, **kwargs)
        if self.tokenizer is None:
            raise ValueError(f"the {self._name} pipeline needs the model's tokenizer (pass tokenizer=...)")
        if self.tokenizer.pad_token_id is None and self.tokenizer.eos_token is not None:
            # batching needs a pad token; the features pad with eos in that case anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token
        head = resolve_head(sdm_head, self.model, head_subfolder, call_options, sdm_head_kwargs)
        self.sdm_head = head.to(self.device)
        self.head_from_model_repository = sdm_head is None  # saved with the model: paired by construction

    @property
    def _name(self) -> str:
        return self.task or type(self).__name__

    def check_input(self, item: Numbered) -> None:
        """Raise ``TypeError``/``ValueError`` naming ``item`` when the task cannot take it."""
        raise NotImplementedError  # pragma: no cover - each task defines it

    def _lengths(self, values: list) -> list[int] | None:
        """Lengths to order a list's inputs by (longest first), or None to keep their order."""
        return None

    def _check_options(self, kwargs: dict[str, Any]) -> None:
        unknown = sorted(set(kwargs) - set(self._options))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for the {self._name} pipeline; valid options: "
                f"{sorted(self._options)} (and batch_size, num_workers)"
            )

    def __call__(self, inputs: Any, **kwargs: Any) -> Any:
        """One dict for one input, a list for a list (``[]`` for an empty one), an iterator for a
        generator or dataset; keywords other than ``batch_size`` / ``num_workers`` are the task's options.

        Raises:
            TypeError / ValueError: naming the first bad input of a list, or an unknown option.
        """
        numbered, is_list = number_inputs(inputs, chats=self._accepts_chats)
        if is_list:
            self._sanitize_parameters(**{k: v for k, v in kwargs.items() if k not in ("batch_size", "num_workers")})
            if not numbered:
                return []
            for item in numbered:  # a wrong type fails before any model work, naming its index
                self.check_input(item)
            batch_size = kwargs.get("batch_size") or self._batch_size or 1
            lengths = self._lengths([item.value for item in numbered]) if len(numbered) > batch_size > 1 else None
            if lengths is not None:
                # a list is consumed whole: batch inputs of similar length (less padding)
                order = sorted(range(len(numbered)), key=lambda i: -lengths[i])
                results = super().__call__([numbered[i] for i in order], **kwargs)
                out: list[Any] = [None] * len(order)
                for position, i in enumerate(order):
                    out[i] = results[position]
                return out
        return super().__call__(numbered, **kwargs)

    def _nearest(self, index: int) -> dict:
        return nearest_exemplar(self.sdm_head, index)
