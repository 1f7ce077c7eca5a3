"""Output directories of the exporters: checked up front, refused in one line when they cannot hold files."""

from __future__ import annotations

import tempfile
from pathlib import Path

from kvzap_eval.errors import ConfigError


def writable_directory(
    path: str | Path, what: str, *, create: bool = True, fix: str = "pass a writable directory"
) -> Path:
    """Check that `path` is, or can be made, a directory files can be written in, and create it unless `create` is
    False; `ConfigError` naming `what` (the option, e.g. "--out") and `fix` when it is a file, lies under a file, or
    it (or, when absent, its nearest existing parent) is not writable. Runs before any long step."""
    path = Path(path).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under the file {str(existing)!r}"
        raise ConfigError(f"{what} {str(path)!r} {where}, not a directory: {fix}")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".kvzap-write-test-"):
            pass
        if create:
            path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        raise ConfigError(f"{what} {str(path)!r} cannot be created or written ({reason}): {fix}") from None
    return path
