"""The engine cache: one serialized engine per layer, stored under a key that says where it can run.

A key holds the TensorRT version, the GPU name and compute capability, the dtype, the profile shapes and the
SHA-256 of the ONNX file. The file name is a digest of the key and a JSON sidecar keeps the key in clear, so an
engine built by another TensorRT or on another GPU is never loaded: it is reported (`stale_engines`) and rebuilt.
One timing cache per TensorRT version and GPU is shared by all layers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path


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


def find_engine(directory: Path, layer: int, key: EngineKey) -> Path | None:
    """The cached engine for this layer and key, if its file and a sidecar with exactly this key exist."""
    path = engine_path(directory, layer, key)
    try:
        stored = EngineKey.from_json(json.loads(sidecar(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return path if path.is_file() and stored == key else None


def stale_engines(directory: Path, layer: int, key: EngineKey) -> list[tuple[Path, EngineKey]]:
    """Engines of this layer built from the same ONNX file for another TensorRT, GPU, dtype or profile."""
    found = []
    for path in sorted(directory.glob(f"layer_{layer:02d}-*.json")):
        try:
            other = EngineKey.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if other != key and other.onnx_sha256 == key.onnx_sha256:
            found.append((path.with_suffix(".engine"), other))
    return found


def store_engine(directory: Path, layer: int, key: EngineKey, data: bytes) -> Path:
    """Write the engine and then its sidecar, each atomically; returns the engine path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = engine_path(directory, layer, key)
    _atomic_write(path, data)
    _atomic_write(sidecar(path), (json.dumps(key.to_json(), indent=2) + "\n").encode())
    return path


def timing_cache_path(directory: Path, tensorrt_version: str, gpu_name: str) -> Path:
    """The timing cache shared by every layer built with this TensorRT on this GPU model."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{gpu_name}-trt{tensorrt_version}").strip("-")
    return directory / f"timing-{slug}.cache"


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
