"""The manifest of an export directory: what was exported from which surrogate, and how it validated.

`manifest.json` sits beside the per-layer files (`layer_00.onnx`, ...). Backends read it, check it against the
surrogate and model they are given (`check_manifest`) and check every layer file against its recorded SHA-256
(`verify_layer_files`) before loading anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvzap_eval.atomic import write_json_atomic
from kvzap_eval.errors import ArtifactError
from kvzap_eval.surrogate import SurrogateConfig

from .source import SourceInfo, file_sha256

MANIFEST_NAME = "manifest.json"
FORMAT = "kvzap-eval/onnx-export/1"
OPSET = 20
INPUT_NAME = "hidden_states"
OUTPUT_NAME = "scores"


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
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        s = data["surrogate"]
        config = SurrogateConfig(s["input_dim"], s["output_dim"], s["n_modules"], s.get("hidden_dim"))
        layers = [LayerArtifact(d["index"], d["file"], d["sha256"], d.get("validation")) for d in data["layers"]]
        return cls(
            source=SourceInfo.from_json(data["source"]),
            surrogate=config,
            dtype=data["dtype"],
            threshold=float(data["threshold"]),
            layers=layers,
            validation=data.get("validation", "skipped"),
            validation_inputs=list(data.get("validation_inputs", [])),
            versions=dict(data.get("versions", {})),
            opset=int(data["opset"]),
            format=data["format"],
        )


def write_manifest(manifest: Manifest, directory: str | os.PathLike) -> Path:
    """Write `manifest.json` atomically (a reader never sees half a manifest). Returns its path."""
    return write_json_atomic(Path(directory) / MANIFEST_NAME, manifest.to_json())


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """Read `directory/manifest.json`; `ArtifactError` if it is missing, unreadable or not an export manifest."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(
            f"{str(directory)!r} has no {MANIFEST_NAME}: export the surrogate there first "
            "(python -m exporters.onnx <hub id | checkpoint dir> --out DIR)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ArtifactError(f"{str(path)!r} has format {data.get('format')!r}, not {FORMAT!r}: re-export")
        return Manifest.from_json(data)
    except ArtifactError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ArtifactError(f"{str(path)!r} is not a readable export manifest ({exc!r}): re-export") from None


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


def verify_layer_files(manifest: Manifest, directory: str | os.PathLike) -> list[Path]:
    """Paths of the layer files, each checked to exist and to match its recorded SHA-256 (`ArtifactError` if not)."""
    directory = Path(directory)
    paths = []
    for artifact in manifest.layers:
        path = directory / artifact.file
        if not path.is_file():
            raise ArtifactError(
                f"layer {artifact.index} file {str(path)!r} is missing: re-export into {str(directory)!r}"
            )
        if file_sha256(path) != artifact.sha256:
            raise ArtifactError(
                f"layer {artifact.index} file {str(path)!r} does not match its manifest (corrupt, truncated or "
                f"replaced): re-export into {str(directory)!r}"
            )
        paths.append(path)
    return paths
