"""File helpers for everything sdm_hf writes: cache location, strict JSON and atomic writes.

An atomic write goes through a locked staging folder beside the target, fsync and one rename, so a killed
run never leaves a half-written file under the final name (design: docs/serving.md, section 'How saves
stay safe').
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from tqdm.auto import tqdm

__all__ = [
    "default_cache_dir",
    "cache_root",
    "file_sha256",
    "loads_strict",
    "read_json",
    "json_text",
    "atomic_write",
    "staging_folder",
    "remove_stale_temporaries",
    "atomic_write_bytes",
    "atomic_write_text",
]

_CHUNK = 8 * 1024 * 1024


def default_cache_dir() -> Path:
    """Where sdm_hf caches converted models and features: ``$SDM_HF_CACHE``, else ``$HF_HOME/sdm_hf``."""
    env = os.environ.get("SDM_HF_CACHE")
    if env:
        return Path(env).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME).expanduser() / "sdm_hf"


def cache_root(cache_dir: str | Path | None) -> Path:
    """``cache_dir`` (``~`` expanded) when given, else :func:`default_cache_dir`."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


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


def _reject_constant(token: str) -> NoReturn:
    raise ValueError(f"non-standard JSON token {token}")


def loads_strict(text: str) -> Any:
    """``json.loads`` that refuses NaN/Infinity (``ValueError``).

    >>> loads_strict('{"a": 1}')
    {'a': 1}
    """
    return json.loads(text, parse_constant=_reject_constant)


def read_json(path: Path) -> Any:
    """Strict JSON (no NaN/Infinity) from ``path``; raises ValueError/OSError."""
    return loads_strict(path.read_text(encoding="utf-8"))


def json_text(value: Any) -> str:
    """``value`` as strict JSON text: indented, keys sorted, a final newline; NaN/Infinity raise ValueError.

    >>> print(json_text({"b": 1, "a": [0.5]}), end="")
    {
      "a": [
        0.5
      ],
      "b": 1
    }
    """
    return json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + "\n"


STALE_SECONDS = 3600  # an unlocked temporary older than this is a leftover (platforms without flock)
_LOCK_NAME = ".lock"


def _try_lock(handle) -> bool | None:
    """Non-blocking exclusive ``flock``: True taken, False held by a live process, None without ``flock``."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a file system without locks
        return None
    return True


@contextmanager
def staging_folder(parent: Path, name: str) -> Iterator[Path]:
    """A fresh folder ``.<name>.<random>.tmp`` in ``parent`` for ``name``'s new content, removed on exit.

    Its lock file stays ``flock``-ed while the writer lives, so :func:`remove_stale_temporaries` spares it.
    """
    parent = Path(parent)
    stage = parent / f".{name}.{uuid.uuid4().hex}.tmp"
    stage.mkdir(parents=True)  # the umask's mode (mkdtemp would make it private)
    handle = open(stage / _LOCK_NAME, "wb")  # noqa: SIM115 - held open for the lock's lifetime
    try:
        _try_lock(handle)
        yield stage
    finally:
        handle.close()
        shutil.rmtree(stage, ignore_errors=True)


def remove_stale_temporaries(parent: Path, name: str = "*", older_than: float = STALE_SECONDS) -> None:
    """Delete the ``.<name>.*.tmp`` that killed writers left in ``parent``: staging folders whose lock is free,
    and, without a lock (or ``flock``), temporaries older than ``older_than`` seconds."""
    now = time.time()
    for leftover in Path(parent).glob(f".{name}.*.tmp"):
        try:
            age = now - leftover.stat().st_mtime
            if leftover.is_dir():
                lock = leftover / _LOCK_NAME
                taken = None
                if lock.is_file():
                    with open(lock, "rb") as handle:
                        taken = _try_lock(handle)
                elif age < 60:  # killed between creating the folder and its lock, or just created
                    continue
                if taken or (taken is None and age > older_than):
                    shutil.rmtree(leftover, ignore_errors=True)
            elif age > older_than:
                leftover.unlink()
        except OSError:  # removed meanwhile by another process
            pass


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Let ``write(tmp)`` create the file in a :func:`staging_folder` beside ``path``, fsync it and
    ``os.replace`` it onto ``path``: ``path`` holds the old file or the new one, never part of one.

    Raises:
        Whatever ``write`` raises (``OSError`` for a full disk), after removing the staging folder.
    """
    path = Path(path)
    with staging_folder(path.parent, path.name) as stage:
        tmp = stage / path.name  # a writer's own temporaries (safetensors makes one) stay inside
        write(tmp)
        with open(tmp, "r+b") as handle:  # a writable handle: fsync of a read-only one fails on Windows
            os.fsync(handle.fileno())
        os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """:func:`atomic_write` of ``data``."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write` of ``text`` (UTF-8)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
