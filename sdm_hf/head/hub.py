"""Hub integration of the SDM head: huggingface_hub's ``ModelHubMixin`` with atomic local saves,
``subfolder`` loading and the one upload path every push in sdm_hf goes through.

A head folder is written into a staging folder beside the target and moved into place file by
file, ``config.json`` last, so a failed save never leaves a half-written head (and a folder
with a ``config.json`` is complete). Uploads write to a temporary folder and commit it in one
``upload_folder`` call.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import torch
from huggingface_hub import HfApi, ModelCard, ModelHubMixin, hf_hub_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects

from ..utils.validation import check_local_or_repo, hub_failure
from . import serialization
from .state import SDMHeadState

__all__ = ["SDMHubMixin", "upload_folder", "fetcher"]


def upload_folder(
    write: Callable[[Path], object],
    repo_id: str,
    *,
    path_in_repo: str | None = None,
    commit_message: str,
    private: bool | None = None,
    token: str | None = None,
    branch: str | None = None,
    create_pr: bool | None = None,
    allow_patterns: list[str] | str | None = None,
    ignore_patterns: list[str] | str | None = None,
    delete_patterns: list[str] | str | None = None,
    dry_run: str | Path | None = None,
) -> str:
    """Let ``write(folder)`` fill a temporary folder, create ``repo_id`` if needed and upload the
    folder (into ``path_in_repo`` when given) in one commit; nothing is left behind locally, and
    a failure while writing creates nothing on the Hub. Every push in sdm_hf goes through here.

    ``private``, ``branch`` (the revision committed to), ``create_pr``, ``allow_patterns`` /
    ``ignore_patterns`` (which local files are uploaded) and ``delete_patterns`` (which remote
    files the same commit deletes, relative to ``path_in_repo``) are huggingface_hub's
    ``create_repo`` / ``HfApi.upload_folder`` arguments, as in ``ModelHubMixin.push_to_hub``.

    Missing or invalid credentials re-raise the huggingface_hub error with a hint.

    ``dry_run=<folder>``: nothing goes over the network; the files that would be uploaded
    (``allow_patterns`` / ``ignore_patterns`` applied) are written into that folder, which must
    not exist or be empty, under ``path_in_repo``.

    Returns:
        The commit URL, or with ``dry_run`` the folder written.
    """
    if dry_run is not None:
        return _dry_run(write, Path(dry_run), path_in_repo, allow_patterns, ignore_patterns)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="sdm_hf_push_") as tmp:
        folder = Path(tmp) / repo_id.split("/")[-1]
        write(folder)
        try:
            repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                path_in_repo=path_in_repo,
                commit_message=commit_message,
                revision=branch,
                create_pr=create_pr,
                allow_patterns=allow_patterns,
                ignore_patterns=ignore_patterns,
                delete_patterns=delete_patterns,
                repo_type="model",
            )
        except (LocalTokenNotFoundError, HfHubHTTPError) as err:
            same_kind: Any = type(err)  # re-raised as its own subclass (RepositoryNotFoundError, ...)
            raise same_kind(
                f"{err}\nHint: pushing needs a Hugging Face token with write access: run `hf auth "
                "login`, set HF_TOKEN, or pass token=...",
                **({"response": err.response} if isinstance(err, HfHubHTTPError) else {}),
            ) from err
    return str(getattr(info, "commit_url", info))


def _dry_run(write, target: Path, path_in_repo, allow_patterns, ignore_patterns) -> str:
    """Write what an upload would send into ``target`` (see :func:`upload_folder`)."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"dry_run folder {target} exists and is not empty; give a new folder")
    with tempfile.TemporaryDirectory(prefix="sdm_hf_dry_run_") as tmp:
        folder = Path(tmp) / "repo"
        write(folder)
        names = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
        chosen = list(filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        destination = target / (path_in_repo or "")
        for name in chosen:
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / name, destination / name)
    target.mkdir(parents=True, exist_ok=True)
    return str(target)


def fetcher(
    source: str,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Callable[[str], Path]:
    """``name -> local path`` of a head's file in a local folder or a Hub repo (downloaded on
    demand); a failed download raises :class:`~sdm_hf.head.serialization.SDMFormatError`."""
    where = f"{source}/{subfolder + '/' if subfolder else ''}"

    def fetch(name: str) -> Path:
        local = Path(os.path.expanduser(source))  # (pathlib's expanduser raises for an unknown ~user)
        if local.is_dir():
            return local / (subfolder or "") / name
        if local.exists():
            raise serialization.SDMFormatError(source, "is a file; pass the folder that holds config.json")
        check_local_or_repo(source, "the SDM head")  # FileNotFoundError for a missing local path
        try:
            return Path(
                hf_hub_download(
                    source,
                    name,
                    subfolder=subfolder,
                    revision=revision,
                    cache_dir=cache_dir,
                    force_download=force_download,
                    local_files_only=local_files_only,
                    token=token,
                )
            )
        except (HfHubHTTPError, OSError, ValueError) as err:
            if isinstance(err, (RepositoryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled)):
                raise hub_failure(source, f"the SDM head file {where}{name}", err) from None  # no repository
            raise serialization.SDMFormatError(
                where + name, f"could not be fetched ({type(err).__name__}: {err})"
            ) from err

    return fetch


def save_state(
    state: SDMHeadState, card: str | None, save_directory: str | Path, overwrite_foreign: bool = False
) -> Path:
    """Write a head's files into ``save_directory``.

    Each file goes through a temporary file and a rename, and ``model.safetensors`` (renamed
    first) holds the whole head: at every moment the folder loads as the old head or the new
    one. A folder whose files were not written by sdm_hf (a transformers model's config.json and
    weights, say) is refused unless ``overwrite_foreign``.
    """
    target = Path(save_directory)
    if not overwrite_foreign:
        check_not_foreign(target)
    config, tensors, documents = serialization.state_to_files(state)
    serialization.write_files(target, config, tensors, documents, card)
    return target


def check_not_foreign(target: Path) -> None:
    """Raise when saving a head into ``target`` would replace files sdm_hf did not write."""
    ours = (
        serialization.CONFIG_NAME,
        serialization.WEIGHTS_NAME,
        serialization.DOCUMENTS_NAME,
        serialization.CARD_NAME,
    )
    present = [name for name in ours if (target / name).exists()]
    if not present:
        return
    config = target / serialization.CONFIG_NAME
    try:
        is_head = config.is_file() and serialization.FORMAT_KEY in json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        is_head = False
    if not is_head:
        raise FileExistsError(
            f"{target} holds {', '.join(present)} not written by sdm_hf (a model's files?); saving the head there "
            f"would replace them. Save it into a subfolder instead (e.g. {target / 'sdm_head'}, which "
            "load_sdm_model and the pipelines find), or pass overwrite_foreign=True"
        )


class SDMHubMixin(ModelHubMixin):
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for a class with
    ``to_state()``, ``from_state(state, device)`` and ``generate_model_card()``.

    The mixin's own serialisation hooks are replaced: an SDM head is more than a state dict
    (support set, calibration arrays), and it is stored as strict JSON + safetensors only.
    """

    def to_state(self, copy: bool = True) -> SDMHeadState:  # pragma: no cover - provided by the model class
        raise NotImplementedError

    if TYPE_CHECKING:  # provided by torch.nn.Module in the model class

        def eval(self) -> Self: ...

    @classmethod
    def from_state(  # pragma: no cover - provided by the model class
        cls, state: SDMHeadState, device: str | torch.device | None = None
    ) -> Self:
        raise NotImplementedError

    def generate_model_card(  # pragma: no cover - provided by the model class
        self, repo_hint: str | None = None, subfolder: str | None = None, **model_card_kwargs: Any
    ) -> ModelCard:
        raise NotImplementedError

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        config: Any = None,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        model_card_kwargs: dict[str, Any] | None = None,
        overwrite_foreign: bool = False,
        **push_kwargs: Any,
    ) -> str | None:
        """Save the head (model.safetensors, config.json, optional support_documents.jsonl,
        README.md model card) into ``save_directory``.

        The arguments are those of huggingface_hub's ``ModelHubMixin.save_pretrained``:
        ``model_card_kwargs`` go into the card (``license``, ``tags``, ``language``, ...; see
        :func:`sdm_hf.head.model_card.render_model_card`), ``push_to_hub=True`` then pushes to
        ``repo_id`` (default: the folder's name) with ``push_kwargs`` as in :meth:`push_to_hub`.
        ``config`` must stay None: the head's configuration is its ``SDMConfig``.

        ``model.safetensors`` holds the whole head (weights, support set, calibration, the
        config in its metadata, the documents as a tensor) and is replaced by one atomic
        rename, so a failed, killed or concurrent save never leaves a folder that loads as a
        mix of two heads: it loads as the old one or the new one. config.json and
        support_documents.jsonl are readable mirrors.

        Save a head that belongs to a model into the model repository's ``sdm_head/``
        subfolder (see :func:`sdm_hf.repository.save_sdm_model`): a folder with files sdm_hf did not
        write (a model's config.json and weights) is refused, unless ``overwrite_foreign``.

        Returns:
            The commit URL when ``push_to_hub=True``, else None.
        """
        reject_config(config)
        # the card's loading snippet names this folder unless told otherwise (push_to_hub names the repo)
        card_kwargs = {"repo_hint": str(save_directory)} | (model_card_kwargs or {})
        card = str(self.generate_model_card(**card_kwargs))
        target = save_state(self.to_state(copy=False), card, save_directory, overwrite_foreign)
        if push_to_hub:
            return self.push_to_hub(repo_id or target.name, model_card_kwargs=model_card_kwargs, **push_kwargs)
        return None

    def _save_pretrained(self, save_directory: Path) -> None:
        # huggingface_hub's hook (its default save paths hand us a folder of their own)
        save_state(self.to_state(copy=False), str(self.generate_model_card()), save_directory, overwrite_foreign=True)

    # keyword-only options and a device: the head reads its own files (config, tensors,
    # documents), not the mixin's single weights file, so the signature differs on purpose
    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        device: str | torch.device | None = None,
    ) -> Self:
        """Load a head from a local folder or a Hub repository (strictly: a missing or
        unexpected tensor, a newer format or any inconsistency raises
        :class:`sdm_hf.head.serialization.SDMFormatError` naming the file).

        Args:
            pretrained_model_name_or_path: a folder, or a Hub repo id.
            subfolder: folder inside it, e.g. ``"sdm_head"`` in an SDM-equipped model repo.
            revision, cache_dir, force_download, local_files_only, token: as in
                ``huggingface_hub.hf_hub_download``.
            device: where the head (and its rebuilt FAISS index) lives; CPU by default.
        """
        fetch = fetcher(
            str(pretrained_model_name_or_path),
            subfolder=subfolder,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
        )
        config, tensors, documents, paths = serialization.read_files(fetch)
        state = serialization.state_from_files(config, tensors, documents, paths)
        return cls.from_state(state, device=device).eval()

    def push_to_hub(  # the mixin's arguments, plus subfolder
        self,
        repo_id: str,
        *,
        config: Any = None,
        subfolder: str | None = None,
        commit_message: str = "Upload SDM head",
        private: bool | None = None,
        token: str | None = None,
        branch: str | None = None,
        create_pr: bool | None = None,
        allow_patterns: list[str] | str | None = None,
        ignore_patterns: list[str] | str | None = None,
        delete_patterns: list[str] | str | None = None,
        model_card_kwargs: dict[str, Any] | None = None,
        dry_run: str | Path | None = None,
    ) -> str:
        """Upload the head to ``repo_id`` (into ``subfolder`` when given) in one commit.

        The arguments are those of huggingface_hub's ``ModelHubMixin.push_to_hub``, plus
        ``subfolder``: ``private`` (for a new repository), ``branch``, ``create_pr``,
        ``allow_patterns`` / ``ignore_patterns`` (which of the head's files are uploaded),
        ``delete_patterns`` (remote files deleted in the same commit, relative to
        ``subfolder``) and ``model_card_kwargs`` (into the head's card, as in
        :meth:`save_pretrained`). ``config`` must stay None: the head's configuration is its
        ``SDMConfig``.

        The files are written to a temporary folder that is removed afterwards; nothing is
        left behind locally on failure. Missing or invalid credentials raise the
        huggingface_hub error with a hint. ``dry_run=<new folder>`` writes exactly the files
        that would be uploaded there instead (nothing goes over the network).

        Returns:
            The commit URL (with ``dry_run``: the folder written).
        """
        reject_config(config)
        return upload_folder(
            lambda folder: self.save_pretrained(
                folder, model_card_kwargs={"repo_hint": repo_id, "subfolder": subfolder} | (model_card_kwargs or {})
            ),
            repo_id,
            path_in_repo=subfolder,
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


def reject_config(config: object) -> None:
    """Raise for the mixin's ``config`` argument: an SDM head's configuration is its
    ``SDMConfig`` (stored with the head), not a separate dictionary."""
    if config is not None:
        raise ValueError(
            "an SDM head's configuration is its SDMConfig (head.config), saved with the head; "
            "change head.config before saving or pushing instead of passing config=..."
        )
