"""CUDA-graph scorer backend: the torch decode call, captured once per (layer, batch, dtype) and replayed.

A decode call [B, 1, D] launches several small kernels whose launch cost exceeds their run time; replaying a
captured graph launches one. Prefill calls (T > 1) are one GEMM each and run through the plain torch backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import ConfigError
from ...surrogate import KVzapSurrogate
from .base import ScorerBackend
from .torch_backend import Placement, TorchBackend


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    static_input: torch.Tensor
    static_output: torch.Tensor


class CudaGraphBackend(ScorerBackend):
    """Decode calls replay a CUDA graph of `TorchBackend`; everything else calls `TorchBackend` directly."""

    name = "cuda_graph"

    def __init__(self, surrogate: KVzapSurrogate, placement: Placement) -> None:
        if not torch.cuda.is_available() or any(device.type != "cuda" for device, _ in placement):
            raise ConfigError(
                "the cuda_graph backend needs every decoder layer on a CUDA device: use torch or onnxruntime on CPU"
            )
        self.torch = TorchBackend(surrogate, placement)
        self.graphs: dict[tuple[int, int, torch.dtype], _Captured] = {}

    def _capture(self, layer_idx: int, hidden_states: torch.Tensor) -> _Captured:
        static_input = torch.zeros_like(hidden_states)
        side = torch.cuda.Stream(hidden_states.device)
        side.wait_stream(torch.cuda.current_stream(hidden_states.device))
        with torch.no_grad():
            with torch.cuda.stream(side):  # warm-up outside the graph (lazy cuBLAS init, workspace allocation)
                for _ in range(2):
                    self.torch(layer_idx, static_input)
            torch.cuda.current_stream(hidden_states.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_output = self.torch(layer_idx, static_input)
        return _Captured(graph, static_input, static_output)

    def __call__(self, layer_idx: int, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.shape[1] != 1 or torch.cuda.is_current_stream_capturing():
            return self.torch(layer_idx, hidden_states)
        key = (layer_idx, hidden_states.shape[0], hidden_states.dtype)
        captured = self.graphs.get(key)
        if captured is None:
            captured = self.graphs[key] = self._capture(layer_idx, hidden_states)
        captured.static_input.copy_(hidden_states)
        captured.graph.replay()
        return captured.static_output.clone()
