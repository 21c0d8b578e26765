"""SDM-equipped model repositories: a base model (or PEFT adapter) at the root, the SDM head
in a subfolder (default ``sdm_head/``), and the repository's README.md model card.

The head never writes into the model's own root (huggingface_hub's mixin would replace the
model's config.json there). The head records the base model's name/revision and the feature
recipe; :func:`load_sdm_model` reports a mismatched pairing.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .head.hub import upload_folder
from .head.modeling import SDMHead
from .persistence import CARD_NAME

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

__all__ = ["DEFAULT_HEAD_SUBFOLDER", "save_sdm_model", "load_sdm_model", "push_sdm_model", "expected_feature_width"]

DEFAULT_HEAD_SUBFOLDER = "sdm_head"


def expected_feature_width(model_config: PretrainedConfig | None, pooling: str | None) -> int | None:
    """Feature width a model config produces under ``pooling``: ``mean_last`` and the
    ``verification`` pooling of SDM language models (the mean hidden state concatenated with
    the hidden state at the ``<verified>`` token) give twice the hidden width."""
    hidden = getattr(model_config, "hidden_size", None)
    if hidden is None:
        return None
    return 2 * int(hidden) if pooling in ("mean_last", "verification") else int(hidden)


def check_pairing(model: torch.nn.Module, head: SDMHead, model_name: str | None = None) -> None:
    """Raise when the head cannot read the model's features; warn when the recorded base
    model differs from the one it is paired with."""
    cfg = head.config
    width = expected_feature_width(getattr(model, "config", None), cfg.feature_pooling)
    if width is not None and width != cfg.input_dim:
        raise ValueError(
            f"the SDM head expects {cfg.input_dim}-dim features but the model produces {width} "
            f"with pooling={cfg.feature_pooling!r}; pair the head with the model it was fitted on"
        )
    name = model_name or getattr(getattr(model, "config", None), "_name_or_path", None)
    if cfg.base_model and name and Path(str(name)).name != Path(cfg.base_model).name:
        warnings.warn(
            f"the SDM head was fitted on features of {cfg.base_model!r} but is paired with {name!r}; "
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
) -> Path:
    """Save ``model`` (a transformers model or PEFT adapter, via its ``save_pretrained``) at
    the root of ``save_directory``, its ``tokenizer`` beside it, the head in ``subfolder``, and
    the repository's README.md model card from the head.

    Records the model's name in the head's config when it has none.
    """
    if not subfolder or Path(subfolder).is_absolute() or ".." in Path(subfolder).parts:
        raise ValueError(f"subfolder must be a relative folder inside the repository, got {subfolder!r}")
    root = Path(save_directory)
    check_pairing(model, head)
    if head.config.base_model is None:
        head.config.base_model = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    pretrained: Any = model  # a transformers or PEFT model: nn.Module's typed attributes lack save_pretrained
    pretrained.save_pretrained(root)
    if tokenizer is not None:
        tokenizer.save_pretrained(root)
    head.save_pretrained(root / subfolder)
    head.generate_model_card(repo_hint=root.name, subfolder=subfolder).save(root / CARD_NAME)
    return root


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
        pretrained_model_name_or_path: the repository.
        model_class: a transformers Auto class (default ``transformers.AutoModel``).
        subfolder: where the head lives.
        sdm_head: an SDMHead, or a path/repo id of one (for PEFT adapter repositories or
            heads stored elsewhere); overrides ``subfolder``.
        device: device of the head.
        model_kwargs: passed to ``model_class.from_pretrained``.
    """
    if model_class is None:
        from transformers import AutoModel

        model_class = AutoModel
    model = model_class.from_pretrained(pretrained_model_name_or_path, **model_kwargs)
    if isinstance(sdm_head, SDMHead):
        head = sdm_head
    elif sdm_head is not None:
        head = SDMHead.from_pretrained(sdm_head, device=device)
    else:
        head = SDMHead.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, device=device)
    check_pairing(model, head, model_name=str(pretrained_model_name_or_path))
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
) -> str:
    """Save the model, tokenizer, head and model card to a temporary folder and upload it in
    one commit (the same upload path as :meth:`SDMHead.push_to_hub`); nothing is left behind
    locally. Returns the commit URL."""
    return upload_folder(
        lambda folder: save_sdm_model(model, head, folder, tokenizer=tokenizer, subfolder=subfolder),
        repo_id,
        commit_message=commit_message,
        private=private,
        token=token,
    )
