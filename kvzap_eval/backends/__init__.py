"""Scorer backends (torch now; ONNX Runtime and TensorRT plug in behind the same `ScorerBackend` contract)."""

from __future__ import annotations

from ..errors import ConfigError
from ..surrogate import KVzapSurrogate
from .base import ScorerBackend
from .torch_backend import Placement, TorchBackend

BACKENDS = ("torch",)


def make_backend(name: str, surrogate: KVzapSurrogate, placement: Placement) -> ScorerBackend:
    """Build the named backend for a surrogate placed like the LLM's decoder layers."""
    if name == "torch":
        return TorchBackend(surrogate, placement)
    raise ConfigError(f"unknown scorer backend {name!r}: choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Placement", "ScorerBackend", "TorchBackend", "make_backend"]
