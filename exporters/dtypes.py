"""The export dtypes: parsing user spellings and mapping them to torch and ONNX types.

`fp32`, `fp16`, `bf16`: weights, input and output in that dtype. `int8`: weight-only quantization for onnxruntime
CPU, where decoding is bound by reading the weights (8 MB per layer call at D=4096 in fp32): the graph is traced in
fp32, then each MatMul's weight is stored as symmetric 8-bit blocks of 32 with one scale each (onnxruntime's
`MatMulNBits`, activations quantized per block at compute, accuracy level 4); input and output stay fp32. TensorRT
cannot parse `MatMulNBits`, so `int8` exports are for onnxruntime only.
"""

from __future__ import annotations

import torch

from kvzap_eval.errors import ConfigError

#: Export dtype name -> torch dtype. The names are what manifests, cache keys and the CLIs use.
#: For weight-only dtypes this is the dtype of the graph's input and output (and of the traced weights).
EXPORT_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32,
}  # fmt: skip

#: ONNX TensorProto element types of the graph input/output (FLOAT=1, FLOAT16=10, BFLOAT16=16).
ONNX_ELEM_TYPES = {"fp32": 1, "fp16": 10, "bf16": 16, "int8": 1}

#: Weight-only quantized dtypes -> bits per weight.
WEIGHT_ONLY_BITS = {"int8": 8}

_ALIASES = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "bf16": "bf16", "bfloat16": "bf16",
    "int8": "int8", "w8": "int8",
}  # fmt: skip


def parse_dtype(value: str | torch.dtype) -> str:
    """The export dtype name for `value` (`"fp16"`, `"float16"`, `torch.float16`...); `ConfigError` if unknown."""
    if isinstance(value, torch.dtype):
        value = str(value)
    name = _ALIASES.get(str(value).lower().removeprefix("torch."))
    if name is None:
        raise ConfigError(f"unknown export dtype {value!r}: use fp32, fp16, bf16 or int8 (weight-only)")
    return name


def dtype_name(dtype: torch.dtype) -> str:
    """The export dtype name of a torch dtype (`ConfigError` for non-exportable ones)."""
    return parse_dtype(dtype)
