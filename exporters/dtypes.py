"""The export dtypes (`fp32`, `fp16`, `bf16`): parsing user spellings and mapping them to torch and ONNX types."""

from __future__ import annotations

import torch

from kvzap_eval.errors import ConfigError

#: Export dtype name -> torch dtype. The names are what manifests, cache keys and the CLIs use.
EXPORT_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

#: ONNX TensorProto element types of the export dtypes (FLOAT=1, FLOAT16=10, BFLOAT16=16).
ONNX_ELEM_TYPES = {"fp32": 1, "fp16": 10, "bf16": 16}

_ALIASES = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "bf16": "bf16", "bfloat16": "bf16",
}  # fmt: skip


def parse_dtype(value: str | torch.dtype) -> str:
    """The export dtype name for `value` (`"fp16"`, `"float16"`, `torch.float16`...); `ConfigError` if unknown."""
    if isinstance(value, torch.dtype):
        value = str(value)
    name = _ALIASES.get(str(value).lower().removeprefix("torch."))
    if name is None:
        raise ConfigError(f"unknown export dtype {value!r}: use fp32, fp16 or bf16")
    return name


def dtype_name(dtype: torch.dtype) -> str:
    """The export dtype name of a torch dtype (`ConfigError` for non-exportable ones)."""
    return parse_dtype(dtype)
