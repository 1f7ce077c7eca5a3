"""TensorRT engines for KVzap surrogates: one engine per layer built from an ONNX export (`python -m exporters.trt`)."""

from .build import (
    BuildConfig,
    EngineSet,
    ensure_engines,
    gpu_identity,
    import_tensorrt,
    layer_keys,
)
from .cache import (
    EngineKey,
    find_engine,
    make_key,
    stale_engines,
    store_engine,
    timing_cache_path,
)
from .profiles import EngineProfiles

__all__ = [
    "BuildConfig",
    "EngineKey",
    "EngineProfiles",
    "EngineSet",
    "ensure_engines",
    "find_engine",
    "gpu_identity",
    "import_tensorrt",
    "layer_keys",
    "make_key",
    "stale_engines",
    "store_engine",
    "timing_cache_path",
]
