"""Hub integration of the SDM head: huggingface_hub's ``ModelHubMixin`` with atomic local saves,
``subfolder`` loading, and the one upload path (a temporary folder, one commit) every push goes through.

Why a save is atomic: docs/serving.md, section 'How saves stay safe'.
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
    """Let ``write(folder)`` fill a temporary folder, create ``repo_id`` if needed and upload the folder
    (into ``path_in_repo``) in one commit. Nothing is left locally; a failed ``write`` creates nothing.

    Args:
        private, branch, create_pr, allow_patterns, ignore_patterns, delete_patterns: huggingface_hub's
            ``create_repo`` / ``HfApi.upload_folder`` arguments (``branch`` is the revision committed to;
            ``delete_patterns`` are relative to ``path_in_repo``).
        dry_run: a new or empty folder: write the files that would be uploaded there (patterns applied,
            under ``path_in_repo``), no network.

    Returns:
        The commit URL, or with ``dry_run`` the folder written.

    Raises:
        LocalTokenNotFoundError / HfHubHTTPError: re-raised with a hint on credentials.
        FileExistsError: ``dry_run`` exists and is not an empty folder.
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
    """``name -> local path`` of a head's file in a local folder or a Hub repo (downloaded on demand).

    The returned callable raises ``SDMFormatError`` when ``source`` is a file or a download fails, and
    ``FileNotFoundError`` for a missing local path, an unknown repo or an offline miss.
    """
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
    """Write a head's files into ``save_directory`` atomically (it loads as the old head or the new one).

    Raises:
        FileExistsError: the folder holds files sdm_hf did not write, unless ``overwrite_foreign``.
    """
    target = Path(save_directory)
    if not overwrite_foreign:
        check_not_foreign(target)
    config, tensors, documents = serialization.state_to_files(state)
    serialization.write_files(target, config, tensors, documents, card)
    return target


def check_not_foreign(target: Path) -> None:
    """Raise ``FileExistsError`` when saving a head into ``target`` would replace files sdm_hf did not write."""
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
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for a class with ``to_state()``,
    ``from_state(state, device)`` and ``generate_model_card()``.

    The mixin's hooks are replaced: a head is more than a state dict (support set, calibration arrays).
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
        """Save the head (model.safetensors, config.json, support_documents.jsonl if any, README.md card)
        into ``save_directory``; a failed, killed or concurrent save leaves the old head or the new one.

        Args:
            config: must stay None (the head's configuration is ``head.config``).
            model_card_kwargs: into the card (``license``, ``tags``, ``language``, ...).
            push_to_hub: then push to ``repo_id`` (default: the folder's name) with ``push_kwargs`` as in
                :meth:`push_to_hub`.
            overwrite_foreign: replace files sdm_hf did not write (save a model's head into its
                ``sdm_head/`` instead, see :func:`sdm_hf.repository.save_sdm_model`).

        Returns:
            The commit URL when ``push_to_hub=True``, else None.

        Raises:
            ValueError: ``config`` is not None.
            FileExistsError: the folder holds files sdm_hf did not write.
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

    # the head reads its own files, not the mixin's single weights file: the signature differs on purpose
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
        """Load a head from a local folder or a Hub repo id, checking everything before building it.

        Args:
            subfolder: folder inside it, e.g. ``"sdm_head"`` in an SDM-equipped model repo.
            revision, cache_dir, force_download, local_files_only, token: as in ``hf_hub_download``.
            device: where the head and its rebuilt FAISS index live (default CPU).

        Raises:
            SDMFormatError: a missing, unreadable, unexpected or inconsistent file or tensor, or another
                format version (naming the file).
            FileNotFoundError: a missing local path, or a Hub repo that cannot be fetched.
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
        """Upload the head to ``repo_id`` (into ``subfolder`` when given) in one commit; nothing is left locally.

        Args:
            private, branch, create_pr, allow_patterns, ignore_patterns, delete_patterns: as in
                huggingface_hub's ``ModelHubMixin.push_to_hub`` (``delete_patterns`` relative to ``subfolder``).
            config: must stay None (the head's configuration is ``head.config``).
            model_card_kwargs: into the head's card, as in :meth:`save_pretrained`.
            dry_run: a new folder: write exactly the files that would be uploaded there, no network.

        Returns:
            The commit URL (with ``dry_run``: the folder written).

        Raises:
            ValueError: ``config`` is not None.
            FileExistsError: ``dry_run`` exists and is not an empty folder.
            LocalTokenNotFoundError / HfHubHTTPError: re-raised with a hint on credentials.
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
    """Raise ``ValueError`` unless ``config`` is None: a head's configuration is its stored ``SDMConfig``."""
    if config is not None:
        raise ValueError(
            "an SDM head's configuration is its SDMConfig (head.config), saved with the head; "
            "change head.config before saving or pushing instead of passing config=..."
        )
