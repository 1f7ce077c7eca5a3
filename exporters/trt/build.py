"""Build (or find in the cache) one TensorRT engine per layer from an ONNX export directory.

The network is parsed from the ONNX file and built strongly typed, so its precision is the export's dtype
(TensorRT 11 is always strongly typed). Two optimization profiles (decode, prefill; see `profiles`), one timing
cache shared by all layers, engines stored under keys that name the TensorRT version and GPU (see `cache`).
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from kvzap_eval.errors import ArtifactError, ConfigError, require

from ..dtypes import WEIGHT_ONLY_BITS
from ..manifest import INPUT_NAME, Manifest, read_manifest, verify_layer_files
from ..onnx.identity import check_layer_files
from ..output import writable_directory
from .cache import (
    ABSENT,
    EngineKey,
    engine_path,
    engine_problem,
    make_key,
    stale_engines,
    store_engine,
    timing_cache_path,
)
from .profiles import EngineProfiles

ENGINE_DIR_NAME = "tensorrt"


@dataclass(frozen=True)
class BuildConfig:
    """Profiles, builder workspace limit (bytes) and the CUDA device the engines are built for."""

    profiles: EngineProfiles = field(default_factory=EngineProfiles)
    workspace_bytes: int = 1 << 30
    device: int = 0


@dataclass
class EngineSet:
    """The engines of one export: `paths[i]` and `keys[i]` belong to layer i."""

    onnx_dir: Path
    engine_dir: Path
    manifest: Manifest
    profiles: EngineProfiles
    paths: list[Path]
    keys: list[EngineKey]


def import_tensorrt():
    """`tensorrt`, or `MissingExtraError` naming the `trt` extra."""
    return require("tensorrt", "trt")


def gpu_identity(device: int = 0) -> tuple[str, tuple[int, int]]:
    """(name, compute capability) of a CUDA device, as torch reports them."""
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("TensorRT engines need a CUDA GPU and torch sees none (CPU-only torch or no device)")
    return torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)


def layer_keys(manifest: Manifest, profiles: EngineProfiles, tensorrt_version: str, gpu: str,
               capability: tuple[int, int]) -> list[EngineKey]:  # fmt: skip
    """The cache key of every layer's engine for this TensorRT and GPU."""
    shapes = profiles.to_json(manifest.surrogate.input_dim)
    return [make_key(tensorrt_version, gpu, capability, manifest.dtype, shapes, a.sha256) for a in manifest.layers]


def _network_flags(trt) -> int:
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if strongly_typed is None else 1 << int(strongly_typed)


def read_onnx(path: Path, sha256: str, layer: int) -> bytes:
    """The bytes of a layer's ONNX file, read once and checked against the manifest's SHA-256 (what TensorRT parses
    is exactly what was checked, even if the file changes afterwards)."""
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ArtifactError(f"layer {layer} file {str(path)!r} changed after it was checked: re-export it")
    return data


def build_engine(
    trt, onnx_path: Path, onnx_bytes: bytes, profiles: EngineProfiles, dim: int, timing_cache: Path, workspace: int
) -> bytes:
    """Serialized engine of one ONNX layer (`onnx_bytes`, read from `onnx_path`); the shared timing cache is read
    before and written after."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes, str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArtifactError(f"TensorRT cannot parse {str(onnx_path)!r} ({errors}): re-export it")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=True)  # a foreign cache is ignored, never fatal
    for low, opt, high in profiles.all(dim):
        profile = builder.create_optimization_profile()
        profile.set_shape(INPUT_NAME, low, opt, high)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ArtifactError(f"TensorRT failed to build an engine from {str(onnx_path)!r} (see its log above)")
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def ensure_engines(
    onnx_dir: str | os.PathLike,
    engine_dir: str | os.PathLike | None = None,
    config: BuildConfig | None = None,
    *,
    rebuild: Collection[int] = (),
    log: Callable[[str], None] | None = None,
) -> EngineSet:
    """Engines for every layer of the export in `onnx_dir` (default engine dir: `<onnx_dir>/tensorrt`).

    The export is checked first (manifest fields, files inside `onnx_dir`, hashes, each file's layer slot and
    signature). Cached engines whose key (which holds the ONNX file's hash) and sidecar match are reused; engines
    built by another TensorRT, GPU, dtype or profile, or whose sidecar does not vouch for them, are reported and
    rebuilt; layers in `rebuild` are rebuilt whatever the cache holds.
    """
    config = config or BuildConfig()
    log = log or (lambda message: print(message, file=sys.stderr))
    trt = import_tensorrt()
    onnx_dir = Path(onnx_dir)
    manifest = read_manifest(onnx_dir)
    if manifest.dtype in WEIGHT_ONLY_BITS:
        raise ConfigError(
            f"the export in {str(onnx_dir)!r} is {manifest.dtype} weight-only (onnxruntime MatMulNBits), which "
            "TensorRT cannot parse: export fp16, bf16 or fp32 for TensorRT"
        )
    files = verify_layer_files(manifest, onnx_dir)
    check_layer_files(manifest, onnx_dir, files)
    engines = writable_directory(
        engine_dir if engine_dir is not None else onnx_dir / ENGINE_DIR_NAME, "engine directory"
    )
    gpu, capability = gpu_identity(config.device)
    keys = layer_keys(manifest, config.profiles, trt.__version__, gpu, capability)
    timing = timing_cache_path(engines, trt.__version__, gpu)
    paths = []
    for i, (onnx_path, key) in enumerate(zip(files, keys)):
        problem = engine_problem(engines, i, key)
        if problem is not None or i in rebuild:
            for stale, other in stale_engines(engines, i, key):
                log(f"layer {i}: {stale.name} was built for {', '.join(key.differences(other))}: rebuilding")
            if problem not in (None, ABSENT):
                log(f"layer {i}: the cached engine is not used: {problem}: rebuilding")
            onnx_bytes = read_onnx(onnx_path, manifest.layers[i].sha256, i)
            dim = manifest.surrogate.input_dim
            data = build_engine(trt, onnx_path, onnx_bytes, config.profiles, dim, timing, config.workspace_bytes)
            store_engine(engines, i, key, data)
        paths.append(engine_path(engines, i, key))
    return EngineSet(onnx_dir, engines, manifest, config.profiles, paths, keys)
