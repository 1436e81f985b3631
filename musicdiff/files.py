"""Atomic file writes: a temporary name in the same directory, flushed to disk, then renamed over the target, so a
reader (or a resumed run) sees the old file or the new one, never part of one.

`atomic_path` / `atomic_directory` hand a writer that needs a file name (soundfile, matplotlib, safetensors, a
tokenizer's save_pretrained) the temporary name; `atomic_write_bytes`, `atomic_write_text` and `atomic_write_json`
cover data already in memory. Every module writes through these, never with its own temporary file and rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def default_mode(directory: bool = False) -> int:
    """The permissions a plain open()/mkdir() would give under the current umask (mkstemp/mkdtemp use 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary file name beside `path` to write; when the block ends without an error the file is flushed
    to disk and renamed over `path`, otherwise removed."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    temporary = Path(name)
    try:
        temporary.chmod(default_mode())
        yield temporary
        fsync_file(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty staging directory beside `path` to fill; when the block ends without an error it is renamed to
    `path` (which must not exist, or be empty), otherwise removed."""
    path = Path(path)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        staging.chmod(default_mode(directory=True))
        yield staging
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def commit_file(written: str | os.PathLike, path: str | os.PathLike) -> None:
    """Flushes a file that a streaming writer finished under a temporary name and renames it to `path` (writers that
    outlive one `with` block, e.g. precompute's ArrayRecord shards, whose `.partial` names resume logic knows)."""
    fsync_file(written)
    os.replace(written, path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["atomic_directory", "atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
           "commit_file", "default_mode", "fsync_file", "sha256_file"]
