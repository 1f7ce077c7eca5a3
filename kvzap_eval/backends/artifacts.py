"""Where a backend finds its exported per-layer files: a directory it is given, or the kvzap-eval cache, where the
surrogate is exported on first use (keyed by its weights fingerprint and the export dtype)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ArtifactError
from ..surrogate import KVzapSurrogate

if TYPE_CHECKING:
    from exporters.manifest import Manifest


def checked_export(
    surrogate: KVzapSurrogate, n_layers: int, artifacts: str | os.PathLike | None, dtype: str
) -> tuple[Path, Manifest]:
    """(directory, manifest) of a validated export of `surrogate` for a model with `n_layers` decoder layers.

    `artifacts` None: the cache directory for this surrogate and `dtype`, exported on first use. A given directory
    must already hold an export (its own dtype is used). Either way the manifest is checked against the surrogate
    and every layer file against its SHA-256; `ArtifactError` says what is wrong and how to fix it.
    """
    from exporters.manifest import check_manifest, read_manifest, verify_layer_files
    from exporters.onnx import default_export_dir
    from exporters.source import weights_sha256

    fingerprint = weights_sha256(surrogate)
    directory = Path(artifacts) if artifacts is not None else default_export_dir(fingerprint, dtype)
    if artifacts is None and not (directory / "manifest.json").is_file():
        _export_once(surrogate, directory, dtype)
    elif artifacts is not None and not directory.is_dir():
        raise ArtifactError(f"artifact directory {str(directory)!r} does not exist: export into it first")
    manifest = read_manifest(directory)
    check_manifest(manifest, surrogate.config, n_layers=n_layers, weights_sha256=fingerprint,
                   where=f"the export in {str(directory)!r}")  # fmt: skip
    verify_layer_files(manifest, directory)
    if manifest.validation == "failed (allowed)":
        print(f"warning: the export in {directory} failed validation and was kept with --allow-mismatch",
              file=sys.stderr)  # fmt: skip
    return directory, manifest


def _export_once(surrogate: KVzapSurrogate, directory: Path, dtype: str) -> None:
    """Export into a temporary sibling and rename it into place (another process may win the race: fine)."""
    from exporters.onnx import ExportValidationError, main_export

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        try:
            main_export(surrogate, tmp, dtype=dtype, hidden_states_model=None)
        except ExportValidationError as exc:  # its files are in `tmp`, which goes: say so, and how to keep one
            raise ExportValidationError(
                f"the automatic {dtype} export of this surrogate was discarded: {exc.summary}; use another dtype, or "
                f"export it with `python -m exporters.onnx <surrogate> --dtype {dtype} --allow-mismatch --out DIR` "
                "and pass it as backend_dir=DIR"
            ) from None
        tmp.chmod(0o755)
        try:
            os.rename(tmp, directory)
        except OSError:
            if not (directory / "manifest.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
