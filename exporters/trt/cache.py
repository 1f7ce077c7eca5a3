"""The engine cache: one serialized engine per layer, stored under a key that says where it can run.

A key holds the TensorRT version, the GPU name and compute capability, the dtype, the profile shapes and the
SHA-256 of the ONNX file (checked against its manifest, slot and, in the backend, the surrogate's weights before any
engine is built). The file name is a digest of the key and a JSON sidecar keeps the key in clear with the layer
index and the engine's own SHA-256, so an engine built by another TensorRT or on another GPU is never loaded: it is
reported (`stale_engines`) and rebuilt; an engine whose sidecar is missing, unreadable, of another layer or whose
bytes do not hash to it is never loaded either (`engine_problem`), and rebuilt. One timing cache per TensorRT
version and GPU is shared by all layers.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from kvzap_eval.atomic import write_bytes_atomic
from kvzap_eval.errors import ArtifactError

from ..source import file_sha256

#: `engine_problem` of a layer and key with no cached engine at all (nothing to report before building one).
ABSENT = "absent"


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine's validity depends on."""

    tensorrt: str
    gpu: str
    compute_capability: str
    dtype: str
    profiles: str  # canonical JSON of `EngineProfiles.to_json(dim)`
    onnx_sha256: str

    @property
    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> EngineKey:
        return cls(**{name: str(data[name]) for name in cls.__dataclass_fields__})

    def differences(self, other: EngineKey) -> list[str]:
        """What differs from `other`, in words (`TensorRT 10.3.0 here, 10.8.0 there`...)."""
        labels = {"tensorrt": "TensorRT", "gpu": "GPU", "compute_capability": "compute capability",
                  "dtype": "dtype", "profiles": "profiles", "onnx_sha256": "ONNX file"}  # fmt: skip
        return [
            f"{label} {getattr(other, name)!s:.40} instead of {getattr(self, name)!s:.40}"
            for name, label in labels.items()
            if getattr(self, name) != getattr(other, name)
        ]


def make_key(
    tensorrt_version: str, gpu_name: str, capability: tuple[int, int], dtype: str, profiles: dict, onnx_sha256: str
) -> EngineKey:
    """Build a key; `profiles` is `EngineProfiles.to_json(dim)`."""
    return EngineKey(tensorrt_version, gpu_name, f"{capability[0]}.{capability[1]}", dtype,
                     json.dumps(profiles, sort_keys=True, separators=(",", ":")), onnx_sha256)  # fmt: skip


def engine_path(directory: Path, layer: int, key: EngineKey) -> Path:
    """`layer_07-<digest>.engine` (its sidecar is the same name with `.json`)."""
    return directory / f"layer_{layer:02d}-{key.digest}.engine"


def sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _read_sidecar(path: Path) -> dict:
    data = json.loads(sidecar(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def engine_problem(directory: Path, layer: int, key: EngineKey) -> str | None:
    """Why the cached engine of this layer and key cannot be used (`ABSENT` when there is none), None when it can:
    its sidecar must hold exactly this key, this layer and the SHA-256 of the engine file, which must be a regular
    file inside `directory` (symlinks resolved)."""
    path = engine_path(directory, layer, key)
    if not sidecar(path).exists() and not path.exists():
        return ABSENT
    try:
        data = _read_sidecar(path)
        stored = EngineKey.from_json(data)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its sidecar {sidecar(path).name} is unreadable ({exc.__class__.__name__})"
    if stored != key:
        return f"its sidecar describes {', '.join(key.differences(stored)) or 'another engine'}"
    if not _same_layer(data, layer):
        return f"its sidecar says layer {data.get('layer')!r}"
    if not path.resolve().is_relative_to(Path(directory).resolve()) or not path.is_file():
        return "the engine file is missing or lies outside the engine directory"
    if data.get("engine_sha256") != file_sha256(path):
        return "the engine file does not hash to its sidecar's engine_sha256 (corrupt, truncated or replaced)"
    return None


def _same_layer(record: dict, layer: int) -> bool:
    return type(record.get("layer")) is int and record["layer"] == layer


def find_engine(directory: Path, layer: int, key: EngineKey) -> Path | None:
    """The cached engine for this layer and key when `engine_problem` finds nothing wrong with it, else None."""
    return engine_path(directory, layer, key) if engine_problem(directory, layer, key) is None else None


def read_engine(path: Path, layer: int) -> bytes:
    """The bytes of a cached engine, read once and checked against its sidecar's layer and SHA-256 (`ArtifactError`
    if they differ: the file changed after `find_engine` vouched for it)."""
    data = path.read_bytes()
    try:
        recorded = _read_sidecar(path)
    except (OSError, ValueError) as exc:
        raise ArtifactError(
            f"engine sidecar {str(sidecar(path))!r} is unreadable ({exc}): rebuild the engines"
        ) from None
    if not _same_layer(recorded, layer) or recorded.get("engine_sha256") != hashlib.sha256(data).hexdigest():
        raise ArtifactError(
            f"engine {str(path)!r} changed after it was checked (it no longer matches its sidecar for layer {layer}): "
            "rebuild the engines (python -m exporters.trt <onnx dir>)"
        )
    return data


def stale_engines(directory: Path, layer: int, key: EngineKey) -> list[tuple[Path, EngineKey]]:
    """Engines of this layer built from the same ONNX file for another TensorRT, GPU, dtype or profile."""
    found = []
    for path in sorted(directory.glob(f"layer_{layer:02d}-*.json")):
        try:
            other = EngineKey.from_json(_read_sidecar(path))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if other != key and other.onnx_sha256 == key.onnx_sha256:
            found.append((path.with_suffix(".engine"), other))
    return found


def store_engine(directory: Path, layer: int, key: EngineKey, data: bytes) -> Path:
    """Write the engine and then its sidecar (the key, the layer and the engine's SHA-256), each atomically; returns
    the engine path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = engine_path(directory, layer, key)
    write_bytes_atomic(path, data)
    record = {**key.to_json(), "layer": layer, "engine_sha256": hashlib.sha256(data).hexdigest()}
    write_bytes_atomic(sidecar(path), (json.dumps(record, indent=2) + "\n").encode())
    return path


def timing_cache_path(directory: Path, tensorrt_version: str, gpu_name: str) -> Path:
    """The timing cache shared by every layer built with this TensorRT on this GPU model."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{gpu_name}-trt{tensorrt_version}").strip("-")
    return directory / f"timing-{slug}.cache"
