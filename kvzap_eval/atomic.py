"""Atomic writes: a reader (or a crash) never sees half a file or half a directory.

A file is written to a temporary sibling, fsync'ed, made world-readable (0644) and renamed over its target
(`write_bytes_atomic`, `write_text_atomic`, `write_json_atomic`; `atomic_file` for writers that want a path). A
directory is filled under a temporary sibling and renamed into place once complete (`staged_directory`); when
another process got there first, its copy is kept.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling of `path` to write to; renamed over `path` (mode 0644) if the block ends without error,
    removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; what we write is meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (see `atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically (see `atomic_file`)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int = 2, sort_keys: bool = False) -> Path:
    """Write `data` as JSON (and a final newline) to `path` atomically (see `atomic_file`)."""
    return write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n")


@contextmanager
def staged_directory(target: str | os.PathLike, complete: str) -> Iterator[Path]:
    """A temporary sibling of `target` to fill; renamed to `target` (mode 0755) if the block ends without error.

    `complete` names the file that a finished `target` holds: when the rename fails because another process renamed
    its own copy first, that copy (holding `complete`) is kept and this one dropped. The temporary directory never
    outlives the block.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp made it private
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / complete).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
