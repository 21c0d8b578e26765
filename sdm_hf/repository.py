"""SDM-equipped model repositories: the model (or PEFT adapter) at the root, the SDM head with its own card
in a subfolder (default ``sdm_head/``), and a README.md that is the model's card with the head merged in.

Usage and the card merge: docs/serving.md, section 'Share it on the Hub'.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import ModelCard

from .features.model_identity import hub_id_of, same_model
from .head.config import is_verification_pooling
from .head.hub import upload_folder
from .head.model_card import head_card_data, merge_model_card
from .head.modeling import SDMHead
from .head.serialization import CARD_NAME
from .utils.validation import explained_hub_failure

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

__all__ = ["DEFAULT_HEAD_SUBFOLDER", "save_sdm_model", "load_sdm_model", "push_sdm_model", "expected_feature_width"]

DEFAULT_HEAD_SUBFOLDER = "sdm_head"


def expected_feature_width(model_config: PretrainedConfig | None, pooling: str | None) -> int | None:
    """Feature width of ``model_config`` under ``pooling`` (None without ``hidden_size``): ``2 * hidden_size``
    for ``mean_last`` and ``verification`` (two hidden states concatenated), else ``hidden_size``."""
    hidden = getattr(model_config, "hidden_size", None)
    if hidden is None:
        return None
    return 2 * int(hidden) if pooling in ("mean_last", "verification") else int(hidden)  # verification-last/-mean: H


def check_pairing(
    model: torch.nn.Module, head: SDMHead, model_name: str | None = None, same_repository: bool = False
) -> None:
    """Check that ``head`` can read ``model``'s features.

    Args:
        model_name: the model's name to compare (default: ``model.config._name_or_path``).
        same_repository: the head was saved with the model in its repository: names are not compared.

    Raises:
        ValueError: the head reads several models' features composed, or a feature width the model does
            not produce.

    Warns:
        UserWarning: the head's recorded base model is another (compared by Hub id where known).
    """
    cfg = head.config
    recipe = cfg.feature_recipe
    if recipe is None:
        names = [b["model"] or f"block {k}" for k, b in enumerate(cfg.feature_blocks or [])]
        raise ValueError(
            f"the SDM head reads features of {len(names)} models concatenated ({', '.join(names)}), so one model "
            "cannot feed it: compute its input with sdm_hf.extract_composed_features (same models and settings, "
            "as recorded in head.config.feature_blocks) and call head.predict"
        )
    width = expected_feature_width(getattr(model, "config", None), recipe.pooling)
    if width is not None and width != cfg.input_dim:
        raise ValueError(
            f"the SDM head expects {cfg.input_dim}-dim features but the model produces {width} "
            f"with pooling={recipe.pooling!r}; pair the head with the model it was fitted on"
        )
    name = model_name or getattr(getattr(model, "config", None), "_name_or_path", None)
    if (
        not same_repository
        and recipe.model
        and name
        and not same_model(recipe.model, model if model_name is None else model_name)
    ):
        warnings.warn(
            f"the SDM head was fitted on features of {recipe.model!r} but is paired with {name!r}; "
            "its calibration only holds for the model it was fitted on",
            UserWarning,
            stacklevel=3,
        )


def save_sdm_model(
    model: torch.nn.Module,
    head: SDMHead,
    save_directory: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    subfolder: str = DEFAULT_HEAD_SUBFOLDER,
    *,
    license: str | None = None,
    model_card_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Save ``model`` (via its ``save_pretrained``) and ``tokenizer`` at the root of ``save_directory``, the
    head with its own card in ``subfolder``, and README.md: the model's card with an SDM section merged in
    (a new card when the model wrote none). Records the model's name in ``head.config.base_model`` if unset.

    Args:
        model: a transformers model or PEFT adapter.
        license: license id for both cards (e.g. ``"apache-2.0"``); None keeps the model card's (or none).
        model_card_kwargs: ``tags`` (added), ``language``, ``datasets``, ... for both cards, ``repo_hint``
            (the name the loading snippets use; default: the folder's name); other keys fill the head's card.

    Returns:
        ``Path(save_directory)``.

    Raises:
        ValueError: ``subfolder`` is not a relative folder inside the repository, a mismatched pairing (as
            :func:`check_pairing`), or an existing README.md with unreadable metadata.
        TypeError: ``license`` is not a string.
        FileExistsError: ``subfolder`` holds files sdm_hf did not write.
    """
    if not subfolder or Path(subfolder).is_absolute() or ".." in Path(subfolder).parts:
        raise ValueError(f"subfolder must be a relative folder inside the repository, got {subfolder!r}")
    if license is not None and not isinstance(license, str):
        raise TypeError(f"license must be a license id string such as 'apache-2.0', got {license!r}")
    root = Path(save_directory)
    check_pairing(model, head)
    if head.config.base_model is None:
        path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        head.config.base_model = hub_id_of(model) or path
    pretrained: Any = model  # a transformers or PEFT model: nn.Module's typed attributes lack save_pretrained
    pretrained.save_pretrained(root)
    if tokenizer is not None:
        tokenizer.save_pretrained(root)
    existing = read_card(root / CARD_NAME)
    card_kwargs = dict(model_card_kwargs or {})
    repo_hint = str(card_kwargs.pop("repo_hint", None) or root.name)  # the name the cards' loading snippets use
    if license is not None:
        card_kwargs["license"] = license
    data = head_card_data(head, repo_hint=repo_hint, subfolder=subfolder)
    card = merge_model_card(existing, data, library_name=root_library(model), **card_kwargs)
    if card.data.get("license") is not None:  # the head's card states the repository's license, never another
        card_kwargs["license"] = card.data.get("license")
    head.save_pretrained(
        root / subfolder, model_card_kwargs=card_kwargs | {"repo_hint": repo_hint, "subfolder": subfolder}
    )
    card.save(root / CARD_NAME)
    return root


def read_card(path: Path) -> ModelCard | None:
    """The model card at ``path``, or None when there is none."""
    if not path.is_file():
        return None
    try:
        return ModelCard.load(path)
    except ValueError as err:
        raise ValueError(
            f"{path} has metadata huggingface_hub cannot read ({err}); fix or remove its YAML block so "
            "that the SDM head can be added to the card"
        ) from err


def root_library(model: torch.nn.Module) -> str:
    """``library_name`` of a new card for ``model``: ``"transformers"`` for a transformers model, else ``"sdm_hf"``."""
    is_transformers = any(
        c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.") for c in type(model).__mro__
    )
    return "transformers" if is_transformers else "sdm_hf"


def load_sdm_model(
    pretrained_model_name_or_path: str | Path,
    model_class: Any = None,
    subfolder: str = DEFAULT_HEAD_SUBFOLDER,
    sdm_head: SDMHead | str | Path | None = None,
    device: str | torch.device | None = None,
    **model_kwargs: Any,
) -> tuple[Any, SDMHead]:
    """Load ``(model, head)`` from an SDM-equipped repository (local folder or Hub id).

    Args:
        model_class: a transformers Auto class (default: ``AutoModelForCausalLM`` for an LM verification
            head, so the model can ``generate``; else ``AutoModel``).
        sdm_head: an SDMHead, or a folder or repo id of one (PEFT adapter repositories, heads stored
            elsewhere); overrides ``subfolder``.
        device: device of the head.
        model_kwargs: passed to ``model_class.from_pretrained``.

    Raises:
        FileNotFoundError: a missing local path, or a Hub repo that cannot be fetched.
        SDMFormatError: the head cannot be loaded.
        ValueError: a mismatched pairing (a head of another model only warns), as :func:`check_pairing`.
    """
    if isinstance(sdm_head, SDMHead):
        head = sdm_head
    elif sdm_head is not None:
        head = SDMHead.from_pretrained(sdm_head, device=device)
    else:
        with explained_hub_failure(pretrained_model_name_or_path, "load_sdm_model"):
            head = SDMHead.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, device=device)
    if model_class is None:  # an LM verification head reads a causal LM: keep its LM head (generate)
        from transformers import AutoModel, AutoModelForCausalLM

        model_class = AutoModelForCausalLM if is_verification_pooling(head.config.feature_pooling) else AutoModel
    with explained_hub_failure(pretrained_model_name_or_path, "load_sdm_model"):
        model = model_class.from_pretrained(pretrained_model_name_or_path, **model_kwargs)
    check_pairing(model, head, model_name=str(pretrained_model_name_or_path), same_repository=sdm_head is None)
    return model, head


def push_sdm_model(
    model: torch.nn.Module,
    head: SDMHead,
    repo_id: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    subfolder: str = DEFAULT_HEAD_SUBFOLDER,
    commit_message: str = "Upload SDM-equipped model",
    private: bool | None = None,
    token: str | None = None,
    *,
    branch: str | None = None,
    create_pr: bool | None = None,
    allow_patterns: list[str] | str | None = None,
    ignore_patterns: list[str] | str | None = None,
    delete_patterns: list[str] | str | None = None,
    license: str | None = None,
    model_card_kwargs: dict[str, Any] | None = None,
    dry_run: str | Path | None = None,
) -> str:
    """Upload what :func:`save_sdm_model` writes to ``repo_id`` in one commit (nothing is left locally).

    Args:
        private, branch, create_pr, allow_patterns, ignore_patterns, delete_patterns: as in
            huggingface_hub's ``ModelHubMixin.push_to_hub`` (patterns relative to the repository root,
            e.g. ``"sdm_head/*"``).
        license, model_card_kwargs: as in :func:`save_sdm_model`.
        dry_run: a new folder: write exactly the files that would be uploaded there, no network.

    Returns:
        The commit URL (with ``dry_run``: the folder written).

    Raises:
        FileExistsError: ``dry_run`` exists and is not an empty folder.
        Also those of :func:`save_sdm_model`, and huggingface_hub's (with a hint for missing credentials).
    """
    return upload_folder(
        lambda folder: save_sdm_model(
            model,
            head,
            folder,
            tokenizer=tokenizer,
            subfolder=subfolder,
            license=license,
            model_card_kwargs={"repo_hint": repo_id} | (model_card_kwargs or {}),
        ),
        repo_id,
        commit_message=commit_message,
        private=private,
        token=token,
        branch=branch,
        create_pr=create_pr,
        allow_patterns=allow_patterns,
        ignore_patterns=ignore_patterns,
        delete_patterns=delete_patterns,
        dry_run=dry_run,
    )
