"""Where a backend finds its exported per-layer files: a directory it is given, or the kvzap-eval cache, where the
surrogate is exported on first use (keyed by its weights fingerprint and the export dtype)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ...atomic import staged_directory
from ...errors import ArtifactError
from ...surrogate import KVzapSurrogate

if TYPE_CHECKING:
    from exporters.manifest import Manifest


@dataclass(frozen=True)
class CheckedExport:
    """An export directory whose manifest and files passed every check: `paths[i]` is layer i's ONNX file."""

    directory: Path
    manifest: Manifest
    paths: list[Path]


def checked_export(
    surrogate: KVzapSurrogate, n_layers: int, artifacts: str | os.PathLike | None, dtype: str
) -> CheckedExport:
    """The directory, manifest and layer files of a checked export of `surrogate` for a model of `n_layers` layers.

    `artifacts` None: the cache directory for this surrogate and `dtype`, exported on first use. A given directory
    must already hold an export (its own dtype is used). Either way the manifest is checked against the surrogate,
    every layer file against its SHA-256, and every file's content against its slot and the surrogate's weights
    (`exporters.onnx.identity`); `ArtifactError` says what is wrong and how to fix it.
    """
    from exporters.manifest import check_manifest, read_manifest, verify_layer_files
    from exporters.onnx import default_export_dir
    from exporters.onnx.identity import check_layer_files
    from exporters.source import weights_sha256

    fingerprint = weights_sha256(surrogate)
    directory = Path(artifacts) if artifacts is not None else default_export_dir(fingerprint, dtype)
    if artifacts is None and not (directory / "manifest.json").is_file():
        _export_once(surrogate, directory, dtype)
    elif artifacts is not None and not directory.is_dir():
        problem = "is a file, not an export directory" if directory.exists() else "does not exist"
        raise ArtifactError(f"artifact directory {str(directory)!r} {problem}: export into a directory first "
                            "(python -m exporters.onnx <hub id | checkpoint dir> --out DIR)")  # fmt: skip
    try:
        manifest = read_manifest(directory)
        check_manifest(manifest, surrogate.config, n_layers=n_layers, weights_sha256=fingerprint,
                       where=f"the export in {str(directory)!r}")  # fmt: skip
        paths = verify_layer_files(manifest, directory)
        check_layer_files(manifest, directory, paths, list(surrogate.layers))
    except ArtifactError as exc:
        if artifacts is not None:
            raise
        raise ArtifactError(f"{exc} (this export is kvzap-eval's cache: remove {str(directory)!r} and it is made "
                            "again on next use)") from None  # fmt: skip
    if manifest.validation == "failed (allowed)":
        print(f"warning: the export in {directory} failed validation and was kept with --allow-mismatch",
              file=sys.stderr)  # fmt: skip
    return CheckedExport(directory, manifest, paths)


def _export_once(surrogate: KVzapSurrogate, directory: Path, dtype: str) -> None:
    """Export into a temporary sibling and rename it into place (another process may win the race: fine)."""
    from exporters.onnx import ExportValidationError, main_export
    from exporters.output import writable_directory

    writable_directory(directory.parent, "the kvzap-eval cache", fix="set KVZAP_EVAL_CACHE to a writable directory")
    with staged_directory(directory, complete="manifest.json") as tmp:
        try:
            main_export(surrogate, tmp, dtype=dtype, hidden_states_model=None)
        except ExportValidationError as exc:  # its files are in `tmp`, which goes: say so, and how to keep one
            raise ExportValidationError(
                f"the automatic {dtype} export of this surrogate was discarded: {exc.summary}; use another dtype, or "
                f"export it with `python -m exporters.onnx <surrogate> --dtype {dtype} --allow-mismatch --out DIR` "
                "and pass it as backend_dir=DIR"
            ) from None
