"""ONNX Runtime scorer backend: one `InferenceSession` per decoder layer, run by IO binding on torch tensors.

Inputs and outputs never go through numpy: the layer's hidden states are bound by `data_ptr()` and the scores are
written straight into a torch tensor. CPU layers use the CPU execution provider; CUDA layers use the CUDA one,
which needs `onnxruntime-gpu` (extra `onnx-gpu`) instead of `onnxruntime` — never both in one environment.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from exporters.dtypes import EXPORT_DTYPES, ONNX_ELEM_TYPES, dtype_name
from exporters.onnx.ort import ORT_DISTRIBUTIONS, import_onnxruntime, installed_onnxruntime  # noqa: F401 (old home)

from ...errors import ArtifactError, ConfigError, MissingExtraError
from ...surrogate import KVzapSurrogate
from .artifacts import checked_export
from .base import ScorerBackend
from .torch_backend import Placement


@dataclass(frozen=True)
class OrtSettings:
    """Session settings: `threads` intra-op threads per session (None = torch's thread count), `spin` lets idle
    workers busy-wait (faster hand-off, but they then steal cores from torch between calls), `dtype` the export
    dtype used when no artifact directory is given (None = follow the layers, see `export_dtype_for`)."""

    threads: int | None = None
    spin: bool = False
    dtype: str | None = None

    def __post_init__(self) -> None:
        threads = self.threads
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ConfigError(f"onnxruntime threads={threads!r} must be a whole number >= 1 (None = torch's count)")


def export_dtype_for(placement: Placement) -> str:
    """The dtype to export for these layers when no export is given: fp16 for fp16 layers, else fp32 (ONNX Runtime
    has no bf16 CPU kernels; bf16 layers are cast in and out)."""
    dtypes = {dtype for _, dtype in placement}
    return "fp16" if dtypes == {torch.float16} else "fp32"


def _check_device(ort, device: torch.device) -> None:
    """Refuse a device this onnxruntime cannot run a layer on (checked before anything is exported)."""
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"onnxruntime runs surrogate layers on cpu or cuda, not on {device}: use backend=torch")
    if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise MissingExtraError("onnxruntime-gpu (CUDA execution provider)", "onnx-gpu")


class _LayerSession:
    """One layer's session and IO binding, bound to torch tensors by pointer on every call.

    At decode the public `IOBinding` wrappers cost more than the model (a few µs of Python checks per call), so
    calls go through onnxruntime's C-level session and binding objects when this onnxruntime exposes them
    (`_sess`, `_iobinding`), with the public API as the fallback.
    """

    def __init__(self, ort, path: str, options, device: torch.device, dtype: torch.dtype, heads: int) -> None:
        self.device = device  # checked by OnnxRuntimeBackend before anything is exported
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            stream = torch.cuda.current_stream(index).cuda_stream
            providers = [("CUDAExecutionProvider", {"device_id": index, "user_compute_stream": str(stream)})]
            device_type, device_id = "cuda", index
        else:
            providers, device_type, device_id = ["CPUExecutionProvider"], "cpu", 0
        try:
            session = ort.InferenceSession(path, options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own classes (Fail, InvalidProtobuf...) derive from it
            raise ArtifactError(f"onnxruntime cannot load {path!r} ({exc}): re-export it") from None
        binding = session.io_binding()
        self.dtype, self.heads, element_type = dtype, heads, ONNX_ELEM_TYPES[dtype_name(dtype)]
        try:
            c_session, c_binding = session._sess, binding._iobinding
            c_device = ort.OrtDevice.make(device_type, device_id)._get_c_device()
        except AttributeError:
            c_session = None
        if c_session is not None:

            def bind_and_run(x_shape, x_ptr, out_shape, out_ptr):
                c_binding.bind_input("hidden_states", c_device, element_type, x_shape, x_ptr)
                c_binding.bind_output("scores", c_device, element_type, out_shape, out_ptr)
                c_session.run_with_iobinding(c_binding, None)

        else:

            def bind_and_run(x_shape, x_ptr, out_shape, out_ptr):
                binding.bind_input("hidden_states", device_type, device_id, element_type, x_shape, x_ptr)
                binding.bind_output("scores", device_type, device_id, element_type, out_shape, out_ptr)
                session.run_with_iobinding(binding)

        self.session, self.bind_and_run = session, bind_and_run

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """Scores (B, H_kv, T) of contiguous hidden states (B, T, D) of the session's dtype and device: the graph
        writes (B, T, H_kv) into memory allocated as the transposed view, so no transpose runs."""
        batch, tokens, _ = x.shape
        heads = self.heads
        out = torch.empty_strided((batch, heads, tokens), (tokens * heads, 1, heads), dtype=x.dtype, device=x.device)
        if tokens and batch:
            self.bind_and_run(x.shape, x.data_ptr(), (batch, tokens, heads), out.data_ptr())
        return out


class OnnxRuntimeBackend(ScorerBackend):
    """Runs an ONNX export of the surrogate (see `exporters.onnx`), one session per decoder layer.

    `artifacts`: an export directory, or None to export `surrogate` into the cache on first use. The manifest is
    checked against the surrogate and the model's layer count, each file against its hash, before any session loads.
    Hidden states of another dtype than the export's are cast on the way in and the scores cast back.
    """

    name = "onnxruntime"

    def __init__(
        self,
        surrogate: KVzapSurrogate,
        placement: Placement,
        artifacts: str | os.PathLike | None = None,
        settings: OrtSettings | None = None,
    ) -> None:
        ort = import_onnxruntime()
        for device in dict.fromkeys(device for device, _ in placement):
            _check_device(ort, device)
        settings = settings or OrtSettings()
        self.threads = settings.threads or torch.get_num_threads()
        dtype = settings.dtype or export_dtype_for(placement)
        export = checked_export(surrogate, len(placement), artifacts, dtype)
        self.directory, self.manifest = export.directory, export.manifest
        self.dtype = EXPORT_DTYPES[self.manifest.dtype]  # int8 is weight-only: fp32 in and out
        if self.dtype == torch.bfloat16 and any(device.type == "cpu" for device, _ in placement):
            raise ConfigError(
                f"the export in {str(self.directory)!r} is bf16, which onnxruntime cannot run on CPU: export fp32 or "
                "fp16 (python -m exporters.onnx ... --dtype fp32)"
            )
        if any(dtype != self.dtype for _, dtype in placement):
            warnings.warn(f"the {self.manifest.dtype} export runs layers of another dtype: hidden states are cast",
                          stacklevel=2)  # fmt: skip
        options = self._options(ort, settings)
        heads = self.manifest.surrogate.output_dim
        self.layers = [
            _LayerSession(ort, str(path), options, device, self.dtype, heads)
            for path, (device, _) in zip(export.paths, placement)
        ]

    def _options(self, ort, settings: OrtSettings):
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_mem_pattern = False  # shapes change every call (prefill lengths)
        options.enable_cpu_mem_arena = False  # an arena per layer would keep each layer's largest prefill buffers
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.spin else "0")
        return options

    def __call__(self, layer_idx: int, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states
        if x.dtype != self.dtype or not x.is_contiguous():
            x = x.to(self.dtype).contiguous()
        out = self.layers[layer_idx].run(x)
        return out if hidden_states.dtype == self.dtype else out.to(hidden_states.dtype)
