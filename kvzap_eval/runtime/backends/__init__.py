"""Scorer backends behind one `ScorerBackend` contract: torch, ONNX Runtime, TensorRT, and torch replayed from CUDA
graphs. Only `torch` needs nothing beyond the base install; the others import their packages when built."""

from __future__ import annotations

import os

from ...errors import ConfigError
from ...surrogate import KVzapSurrogate
from .base import ScorerBackend
from .torch_backend import Placement, TorchBackend

BACKENDS = ("torch", "onnxruntime", "tensorrt", "cuda_graph")


def make_backend(
    name: str,
    surrogate: KVzapSurrogate,
    placement: Placement,
    artifacts: str | os.PathLike | None = None,
    threads: int | None = None,
) -> ScorerBackend:
    """Build the named backend for a surrogate placed like the LLM's decoder layers.

    `artifacts`: the exported files (ONNX export directory for `onnxruntime`; ONNX export or engine directory for
    `tensorrt`); None exports `surrogate` into the kvzap-eval cache on first use. `threads`: onnxruntime intra-op
    threads (None = torch's count). `torch` and `cuda_graph` use neither.
    """
    if name in ("torch", "cuda_graph") and artifacts is not None:
        raise ConfigError(f"the {name} backend runs the surrogate's own weights and takes no artifact directory: "
                          "drop backend_dir, or use backend=onnxruntime or tensorrt")  # fmt: skip
    if name == "torch":
        return TorchBackend(surrogate, placement)
    if name == "onnxruntime":
        from .onnxruntime_backend import OnnxRuntimeBackend, OrtSettings

        return OnnxRuntimeBackend(surrogate, placement, artifacts, OrtSettings(threads=threads))
    if name == "tensorrt":
        from .tensorrt_backend import TensorRTBackend

        return TensorRTBackend(surrogate, placement, artifacts)
    if name == "cuda_graph":
        from .cuda_graph_backend import CudaGraphBackend

        return CudaGraphBackend(surrogate, placement)
    raise ConfigError(f"unknown scorer backend {name!r}: choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Placement", "ScorerBackend", "TorchBackend", "make_backend"]
