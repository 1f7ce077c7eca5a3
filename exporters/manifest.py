"""The manifest of an export directory: what was exported from which surrogate, and how it validated.

`manifest.json` sits beside the per-layer files (`layer_00.onnx`, ...). Backends read it (`read_manifest`: every
field of the right type and range, layer indices 0..n-1, one file per layer), check it against the surrogate and
model they are given (`check_manifest`) and check every layer file against its recorded SHA-256
(`verify_layer_files`) before loading anything. A file named by a manifest must lie inside the export directory
once symlinks are resolved (`path_inside`); anything else is refused before it is opened.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvzap_eval.atomic import write_json_atomic
from kvzap_eval.errors import ArtifactError
from kvzap_eval.surrogate import SurrogateConfig

from .dtypes import EXPORT_DTYPES
from .source import SourceInfo, file_sha256

MANIFEST_NAME = "manifest.json"
FORMAT = "kvzap-eval/onnx-export/1"
OPSET = 20
INPUT_NAME = "hidden_states"
OUTPUT_NAME = "scores"
#: ONNX metadata key holding the layer index a file was exported for (`exporters.onnx.identity` checks it).
LAYER_METADATA_KEY = "kvzap.layer"
VALIDATION_STATES = ("passed", "failed (allowed)", "skipped")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def layer_file_name(index: int) -> str:
    """`layer_00.onnx`, `layer_01.onnx`, ..."""
    return f"layer_{index:02d}.onnx"


@dataclass
class LayerArtifact:
    """One exported layer: its file, the file's SHA-256 and its validation report (None when not validated)."""

    index: int
    file: str
    sha256: str
    validation: dict[str, Any] | None = None


@dataclass
class Manifest:
    """Everything a backend needs to trust an export directory (see the module docstring)."""

    source: SourceInfo
    surrogate: SurrogateConfig
    dtype: str
    threshold: float
    layers: list[LayerArtifact]
    validation: str = "skipped"  # "passed", "failed (allowed)" or "skipped"
    validation_inputs: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    opset: int = OPSET
    format: str = FORMAT

    @property
    def input_dims(self) -> list[str | int]:
        return ["batch", "sequence", self.surrogate.input_dim]

    @property
    def output_dims(self) -> list[str | int]:
        return ["batch", "sequence", self.surrogate.output_dim]

    def to_json(self) -> dict[str, Any]:
        s = self.surrogate
        return {
            "format": self.format,
            "source": self.source.to_json(),
            "surrogate": {"model_type": s.model_type, "input_dim": s.input_dim, "output_dim": s.output_dim,
                          "hidden_dim": s.hidden_dim, "n_modules": s.n_modules},
            "dtype": self.dtype,
            "opset": self.opset,
            "threshold": self.threshold,
            "input": {"name": INPUT_NAME, "dims": self.input_dims},
            "output": {"name": OUTPUT_NAME, "dims": self.output_dims},
            "validation": self.validation,
            "validation_inputs": list(self.validation_inputs),
            "versions": dict(self.versions),
            "layers": [{"index": a.index, "file": a.file, "sha256": a.sha256, "validation": a.validation}
                       for a in self.layers],
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """Parse a manifest, checking every field's type and range (`ManifestFieldError` names the first bad one)."""
        data = _field({"manifest": data}, "manifest", dict, "")
        surrogate = _surrogate_config(_field(data, "surrogate", dict))
        layers = [_layer_artifact(entry, i) for i, entry in enumerate(_field(data, "layers", list))]
        _check_layer_list(layers, surrogate)
        manifest = cls(
            source=_source_info(_field(data, "source", dict)),
            surrogate=surrogate,
            dtype=_choice(data, "dtype", tuple(EXPORT_DTYPES)),
            threshold=_finite(data, "threshold"),
            layers=layers,
            validation=_choice(data, "validation", VALIDATION_STATES, default="skipped"),
            validation_inputs=_string_list(data, "validation_inputs"),
            versions=_string_dict(data, "versions"),
            opset=_field(data, "opset", int),
            format=_field(data, "format", str),
        )
        for key, dims in (("input", manifest.input_dims), ("output", manifest.output_dims)):
            _check_signature(data, key, dims)
        return manifest


class ManifestFieldError(ArtifactError, ValueError):
    """A manifest field is missing or has the wrong type or value (the message names the field)."""


def _field(data: dict, key: str, kind: type | tuple[type, ...], where: str = "", *, optional: bool = False) -> Any:
    """`data[key]` checked to be a `kind` (a bool never counts as a number; an int counts as a float)."""
    name = f"{where}{key}"
    if key not in data:
        if optional:
            return None
        raise ManifestFieldError(f"field {name!r} is missing")
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds:
        kinds = (*kinds, int)
    if value is None and optional:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise ManifestFieldError(f"field {name!r} is {value!r:.60}, expected {expected}")
    return value


def _choice(data: dict, key: str, choices: tuple[str, ...], *, default: str | None = None) -> str:
    value = _field(data, key, str, optional=default is not None)
    value = default if value is None else value
    if value not in choices:
        raise ManifestFieldError(f"field {key!r} is {value!r}, expected one of {', '.join(choices)}")
    return value


def _finite(data: dict, key: str) -> float:
    value = float(_field(data, key, float))
    if not math.isfinite(value):
        raise ManifestFieldError(f"field {key!r} is {value}, expected a finite number")
    return value


def _sha256(data: dict, key: str, where: str) -> str:
    value = _field(data, key, str, where)
    if not _SHA256.fullmatch(value):
        raise ManifestFieldError(f"field {where + key!r} is {value!r:.70}, expected 64 lowercase hex digits (SHA-256)")
    return value


def _string_list(data: dict, key: str) -> list[str]:
    values = _field(data, key, list, optional=True) or []
    if not all(isinstance(v, str) for v in values):
        raise ManifestFieldError(f"field {key!r} must be a list of strings")
    return list(values)


def _string_dict(data: dict, key: str, where: str = "") -> dict[str, str]:
    values = _field(data, key, dict, where, optional=True) or {}
    if not all(isinstance(v, str) for v in values.values()):
        raise ManifestFieldError(f"field {where + key!r} must map names to strings")
    return dict(values)


def _source_info(data: dict) -> SourceInfo:
    return SourceInfo(
        _field(data, "id", str, "source."),
        _sha256(data, "weights_sha256", "source."),
        _field(data, "revision", str, "source.", optional=True),
        _string_dict(data, "files", "source."),
    )


def _surrogate_config(data: dict) -> SurrogateConfig:
    dims = {key: _field(data, key, int, "surrogate.") for key in ("input_dim", "output_dim", "n_modules")}
    hidden = _field(data, "hidden_dim", int, "surrogate.", optional=True)
    try:
        config = SurrogateConfig(**dims, hidden_dim=hidden)
    except ValueError as exc:  # ConfigError: a dim that is not a positive integer
        raise ManifestFieldError(f"field 'surrogate' is not a valid surrogate shape ({exc})") from None
    model_type = _field(data, "model_type", str, "surrogate.", optional=True)
    if model_type is not None and model_type != config.model_type:
        raise ManifestFieldError(
            f"field 'surrogate.model_type' is {model_type!r} but hidden_dim={hidden} makes it {config.model_type!r}"
        )
    return config


def _layer_artifact(entry: Any, position: int) -> LayerArtifact:
    where = f"layers[{position}]."
    entry = _field({f"layers[{position}]": entry}, f"layers[{position}]", dict)
    validation = _field(entry, "validation", dict, where, optional=True)
    return LayerArtifact(_field(entry, "index", int, where), _field(entry, "file", str, where),
                         _sha256(entry, "sha256", where), validation)  # fmt: skip


def _check_layer_list(layers: list[LayerArtifact], surrogate: SurrogateConfig) -> None:
    """One entry per surrogate layer, in order (index i at position i), each naming its own file."""
    if len(layers) != surrogate.n_modules:
        raise ManifestFieldError(f"field 'layers' has {len(layers)} entries for a surrogate of {surrogate.n_modules}")
    for position, artifact in enumerate(layers):
        if artifact.index != position:
            raise ManifestFieldError(f"field 'layers[{position}].index' is {artifact.index}, expected {position}")
    files = [os.path.normpath(a.file) for a in layers]
    repeated = sorted({name for name in files if files.count(name) > 1})
    if repeated:
        raise ManifestFieldError(f"field 'layers' names {repeated[0]!r} for more than one layer")


def _check_signature(data: dict, key: str, dims: list[str | int]) -> None:
    """The optional `input` / `output` entries must agree with the surrogate's shape."""
    entry = _field(data, key, dict, optional=True)
    if entry is None:
        return
    expected = {"name": INPUT_NAME if key == "input" else OUTPUT_NAME, "dims": dims}
    if {name: entry.get(name) for name in expected} != expected:
        raise ManifestFieldError(f"field {key!r} is {entry!r:.80}, expected {expected}")


def write_manifest(manifest: Manifest, directory: str | os.PathLike) -> Path:
    """Write `manifest.json` atomically (a reader never sees half a manifest). Returns its path."""
    return write_json_atomic(Path(directory) / MANIFEST_NAME, manifest.to_json())


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """Read `directory/manifest.json`; `ArtifactError` if it is missing, unreadable, not an export manifest or has a
    field of the wrong type or value."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(
            f"{str(directory)!r} has no {MANIFEST_NAME}: export the surrogate there first "
            "(python -m exporters.onnx <hub id | checkpoint dir> --out DIR)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ArtifactError(f"{str(path)!r} is not a readable export manifest ({exc!r}): re-export") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ArtifactError(f"{str(path)!r} has format {found!r}, not {FORMAT!r}: re-export")
    try:
        return Manifest.from_json(data)
    except ManifestFieldError as exc:
        raise ArtifactError(f"{str(path)!r} is not a valid export manifest: {exc}: re-export") from None


def check_manifest(
    manifest: Manifest,
    surrogate: SurrogateConfig,
    *,
    n_layers: int | None = None,
    weights_sha256: str | None = None,
    where: str = "the export",
) -> None:
    """Raise `ArtifactError` (one line, every mismatch) unless the manifest describes this surrogate and model.

    `n_layers` is the LLM's decoder-layer count; `weights_sha256` the fingerprint of the surrogate in use.
    """
    ours = manifest.surrogate
    problems = [
        f"{name}={getattr(ours, name)} where the surrogate has {getattr(surrogate, name)}"
        for name in ("input_dim", "output_dim", "hidden_dim", "n_modules")
        if getattr(ours, name) != getattr(surrogate, name)
    ]
    if n_layers is not None and len(manifest.layers) != n_layers:
        problems.append(f"{len(manifest.layers)} layer files where the model has {n_layers} decoder layers")
    if [a.index for a in manifest.layers] != list(range(len(manifest.layers))):
        problems.append("layer indices that are not 0..n-1")
    if not problems and weights_sha256 is not None and manifest.source.weights_sha256 != weights_sha256:
        problems.append(
            f"weights {manifest.source.weights_sha256[:12]} (from {manifest.source.id!r}) where the surrogate in use "
            f"has weights {weights_sha256[:12]}"
        )
    if problems:
        raise ArtifactError(
            f"{where} was made for another surrogate or model: {'; '.join(problems)}: re-export this surrogate "
            "(python -m exporters.onnx <hub id | checkpoint dir> --out DIR)"
        )


def path_inside(directory: str | os.PathLike, name: str, what: str) -> Path:
    """The resolved path of `name`, a file a manifest names, refused (`ArtifactError`) unless it is relative and lies
    inside `directory` once every symlink is resolved. Nothing is opened: this runs before a file is read or hashed."""
    root = Path(directory).resolve()
    problem = None
    if not name or "\0" in name:
        problem = "is empty or holds a NUL character"
    elif os.path.isabs(name) or Path(name).drive:
        problem = "is an absolute path"
    else:
        resolved = (root / name).resolve()
        if resolved == root or not resolved.is_relative_to(root):
            problem = "lies outside the export directory" + (" (through a symlink)" if ".." not in name else "")
    if problem:
        raise ArtifactError(
            f"{what} {name!r} named by {str(root / MANIFEST_NAME)!r} {problem}: an export only uses files inside its "
            "own directory; re-export into a fresh directory"
        )
    return resolved


def layer_paths(manifest: Manifest, directory: str | os.PathLike) -> list[Path]:
    """Every layer file's resolved path, each checked by `path_inside` (all of them, before any is opened)."""
    return [path_inside(directory, a.file, f"layer {a.index} file") for a in manifest.layers]


def verify_layer_files(manifest: Manifest, directory: str | os.PathLike) -> list[Path]:
    """Paths of the layer files, each checked to lie inside `directory`, to exist and to match its recorded SHA-256
    (`ArtifactError` if not)."""
    directory = Path(directory)
    paths = layer_paths(manifest, directory)
    for artifact, path in zip(manifest.layers, paths):
        if not path.is_file():
            raise ArtifactError(
                f"layer {artifact.index} file {str(path)!r} is missing: re-export into {str(directory)!r}"
            )
        if file_sha256(path) != artifact.sha256:
            raise ArtifactError(
                f"layer {artifact.index} file {str(path)!r} does not match its manifest (corrupt, truncated or "
                f"replaced): re-export into {str(directory)!r}"
            )
    return paths
