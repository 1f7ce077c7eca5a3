"""TensorRT scorer backend: one engine per layer, run on torch tensors on torch's current CUDA stream.

Each engine has two execution contexts (decode profile 0, prefill profile 1) created with user-managed device
memory; every context of a device points at one shared scratch buffer, sized for the largest engine, which is safe
because the scorer calls of all layers run one after another on the same stream. Inputs and outputs are bound with
`set_tensor_address(tensor.data_ptr())` and run with `execute_async_v3(torch.cuda.current_stream())`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from exporters.dtypes import EXPORT_DTYPES

from ...errors import ArtifactError, ConfigError
from ...surrogate import KVzapSurrogate
from .artifacts import checked_export
from .base import ScorerBackend
from .torch_backend import Placement


def export_dtype_for(placement: Placement) -> str:
    """The export dtype matching the layers (engines are strongly typed): bf16, fp16, else fp32."""
    dtypes = {dtype for _, dtype in placement}
    return {frozenset({torch.bfloat16}): "bf16", frozenset({torch.float16}): "fp16"}.get(frozenset(dtypes), "fp32")


def _device_memory_size(engine) -> int:
    return int(getattr(engine, "device_memory_size_v2", None) or engine.device_memory_size)


def _set_device_memory(context, pointer: int, size: int) -> None:
    if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1
        context.set_device_memory(pointer, size)
    else:
        context.device_memory = pointer


class _LayerEngine:
    """One layer's engine and its decode and prefill contexts."""

    def __init__(self, trt, engine, device: torch.device) -> None:
        self.engine, self.device = engine, device
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        with torch.cuda.device(device):  # contexts belong to the device current at creation
            self.contexts = [engine.create_execution_context(strategy) for _ in range(2)]
        self.memory = _device_memory_size(engine)

    def bind_scratch(self, scratch: torch.Tensor, stream: int) -> None:
        for index, context in enumerate(self.contexts):
            _set_device_memory(context, scratch.data_ptr(), self.memory)
            context.set_optimization_profile_async(index, stream)


class TensorRTBackend(ScorerBackend):
    """Runs TensorRT engines built from the ONNX export of the surrogate (see `exporters.trt`).

    `artifacts`: an ONNX export directory (engines are kept in its `tensorrt/` folder), or None to export into the
    cache on first use. Engines are built when missing, and rebuilt when they were built by another TensorRT or GPU.
    """

    name = "tensorrt"

    def __init__(self, surrogate: KVzapSurrogate, placement: Placement, artifacts: str | os.PathLike | None = None,
                 build_config=None) -> None:  # fmt: skip
        from exporters.trt import build

        trt = build.import_tensorrt()
        if any(device.type != "cuda" for device, _ in placement):
            raise ConfigError("the tensorrt backend needs every decoder layer on a CUDA device: use onnxruntime on CPU")
        export = checked_export(surrogate, len(placement), artifacts, export_dtype_for(placement))
        onnx_dir, manifest = export.directory, export.manifest
        self.build_config = build_config or build.BuildConfig(device=placement[0][0].index or 0)
        self.profiles = self.build_config.profiles
        engines = build.ensure_engines(onnx_dir, None, self.build_config)  # refuses int8 weight-only exports
        self.dtype = EXPORT_DTYPES[manifest.dtype]
        self.heads = manifest.surrogate.output_dim
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.layers = []
        self.devices = sorted({device for device, _ in placement}, key=str)
        for i, (path, (device, _)) in enumerate(zip(engines.paths, placement)):
            with torch.cuda.device(device):  # an engine lives on the device current when it is deserialized
                engine = self._deserialize(runtime, path, i)
            if engine is None:  # the key matched but this TensorRT/GPU refuses the engine: rebuild once
                print(f"layer {i}: TensorRT could not deserialize {path.name}: rebuilding", file=sys.stderr)
                path = build.ensure_engines(onnx_dir, None, self.build_config, rebuild={i}).paths[i]
                with torch.cuda.device(device):
                    engine = self._deserialize(runtime, path, i)
                if engine is None:
                    raise ArtifactError(f"TensorRT cannot deserialize the engine it just built ({str(path)!r})")
            self.layers.append(_LayerEngine(trt, engine, device))
        self.scratch = self._share_scratch()

    @staticmethod
    def _deserialize(runtime, path: Path, layer: int):
        """The engine of `path`, from bytes checked against its sidecar (`exporters.trt.cache.read_engine`)."""
        from exporters.trt.cache import read_engine

        return runtime.deserialize_cuda_engine(read_engine(path, layer))

    def _share_scratch(self) -> dict[torch.device, torch.Tensor]:
        """One scratch buffer per device, as large as its largest engine needs, bound to every context."""
        scratch = {}
        for device in {layer.device for layer in self.layers}:
            on_device = [layer for layer in self.layers if layer.device == device]
            size = max(max(layer.memory for layer in on_device), 1)
            scratch[device] = torch.empty(size, dtype=torch.uint8, device=device)
            stream = torch.cuda.current_stream(device).cuda_stream
            for layer in on_device:
                layer.bind_scratch(scratch[device], stream)
        return scratch

    def __call__(self, layer_idx: int, hidden_states: torch.Tensor) -> torch.Tensor:
        layer = self.layers[layer_idx]
        x = hidden_states
        if x.dtype != self.dtype or not x.is_contiguous():
            x = x.to(self.dtype).contiguous()
        out = x.new_empty((x.shape[0], x.shape[1], self.heads))  # the engine's (B, T, H_kv) layout
        if x.numel() == 0:
            return out.transpose(1, 2)
        context = layer.contexts[self.profiles.profile_for(tuple(x.shape))]
        context.set_input_shape("hidden_states", tuple(x.shape))
        context.set_tensor_address("hidden_states", x.data_ptr())
        context.set_tensor_address("scores", out.data_ptr())
        if len(self.devices) > 1:  # model parallel: TensorRT enqueues on the current device, make it this layer's
            with torch.cuda.device(layer.device):
                ok = context.execute_async_v3(torch.cuda.current_stream(x.device).cuda_stream)
        else:
            ok = context.execute_async_v3(torch.cuda.current_stream(x.device).cuda_stream)
        if not ok:
            raise ArtifactError(f"TensorRT failed to run layer {layer_idx} on input {list(x.shape)}")
        out = out.transpose(1, 2)
        return out if hidden_states.dtype == self.dtype else out.to(hidden_states.dtype)
