"""Is an exported layer file what its manifest slot says it is? Checked on the file's content before any runtime
loads it, after its SHA-256 has matched the manifest (a hash only proves the file is the one the manifest names).

Per file, `check_layer_file`:
- no initializer keeps its data outside the file (kvzap-eval exports never do; an external-data path is a file the
  manifest does not name and no hash covers);
- the graph's input and output are `hidden_states` [batch, sequence, D] and `scores` [batch, sequence, H_kv] of the
  manifest's dtype (a runtime binds buffers of that dtype and those sizes);
- its `kvzap.layer` metadata, written by the exporter, equals the manifest slot (a reordered manifest is caught
  even when every hash was updated);
- given the surrogate layer it must hold, its weights are that layer's weights: each parameter cast to the export
  dtype equals one float initializer bit for bit (or its transpose), each `MatMulNBits` weight (int8) dequantises
  to within one quantisation step of one parameter (rounding costs half a step, the clamp of a block's largest
  value to 127 one step), and no weight is left over.

Why compare weights rather than run a numeric probe through a session: it is exact for fp32, fp16 and bf16 (a probe
needs a tolerance that a near-copy could pass), it needs no runtime (onnxruntime has no bf16 CPU kernels, TensorRT
engines are built only after this check), and it costs one pass over bytes the hash check has just read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kvzap_eval.errors import ArtifactError, require

from ..dtypes import EXPORT_DTYPES
from ..manifest import LAYER_METADATA_KEY, Manifest
from .validate import graph_signature_problems

#: ONNX TensorProto element type -> torch dtype, for the initializer types an export holds.
_TORCH_TYPES = {1: torch.float32, 10: torch.float16, 16: torch.bfloat16, 11: torch.float64, 2: torch.uint8,
                3: torch.int8, 7: torch.int64}  # fmt: skip
_FLOAT_TYPES = {1, 10, 16, 11}
_EXTERNAL = 1  # TensorProto.EXTERNAL


def _fix(directory: Path) -> str:
    return f"re-export this surrogate (python -m exporters.onnx <hub id | checkpoint dir> --out {directory})"


def load_layer_model(path: Path, where: str = "layer file"):
    """The file's `ModelProto`, without following any external-data reference; `ArtifactError` if unreadable."""
    onnx = require("onnx", "onnx")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and onnx's own errors share no base class
        raise ArtifactError(
            f"{where} {str(path)!r} is not a readable ONNX file ({exc.__class__.__name__}): re-export it"
        ) from None


def _initializer_tensor(init) -> torch.Tensor:
    """An initializer's values as a CPU tensor (raw little-endian bytes or onnx's typed fields)."""
    dtype = _TORCH_TYPES[init.data_type]
    if init.raw_data:
        return torch.frombuffer(bytearray(init.raw_data), dtype=dtype).reshape(tuple(init.dims))
    from onnx import numpy_helper

    return torch.from_numpy(numpy_helper.to_array(init).copy()).to(dtype).reshape(tuple(init.dims))


def _attribute(node, name: str, default: int | None = None) -> int | None:
    return next((attr.i for attr in node.attribute if attr.name == name), default)


def _dequantised_weights(
    model, initializers: dict[str, torch.Tensor]
) -> list[tuple[set[str], torch.Tensor, torch.Tensor]]:
    """For each 8-bit `MatMulNBits` node: (initializer names it uses, weight [N, K] in fp32, per-element tolerance of
    one quantisation step). Layout (onnxruntime contrib op): B uint8 [N, blocks, block_size], scales [N * blocks],
    optional zero points uint8 [N, blocks] (default 128, symmetric)."""
    found = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        bits, block = _attribute(node, "bits"), _attribute(node, "block_size")
        n, k = _attribute(node, "N"), _attribute(node, "K")
        names = [name for name in node.input[1:4] if name]
        if bits != 8 or None in (block, n, k) or any(name not in initializers for name in names[:2]):
            raise ValueError(f"a MatMulNBits node ({bits} bits) that kvzap-eval does not write")
        blocks = -(-k // block)
        quantised = initializers[names[0]].reshape(n, blocks, block).float()
        scales = initializers[names[1]].reshape(n, blocks, 1).float()
        zero = initializers[names[2]].reshape(n, blocks, 1).float() if len(names) > 2 else 128.0
        weight = ((quantised - zero) * scales).reshape(n, blocks * block)[:, :k]
        step = scales.abs().expand(n, blocks, block).reshape(n, blocks * block)[:, :k]
        found.append((set(names), weight, step * (1 + 1e-3) + 1e-7))
    return found


def weights_problem(model, layer: nn.Module, dtype: str) -> str | None:
    """Why `model` does not hold exactly `layer`'s weights in `dtype` (None when it does); see the module docstring."""
    # other element types hold no weight of ours (and a weight stored in one is missing from the file)
    kept = [init for init in model.graph.initializer if init.data_type in _TORCH_TYPES]
    initializers = {init.name: _initializer_tensor(init) for init in kept}
    quantised = _dequantised_weights(model, initializers)
    used_by_quantised = set().union(*(names for names, _, _ in quantised))
    floats = {name: t for name, t in initializers.items() if t.is_floating_point() and name not in used_by_quantised}
    target = EXPORT_DTYPES[dtype]
    for name, param in layer.state_dict().items():
        value = param.detach().to("cpu", torch.float32).to(target)
        match = next((key for key, t in floats.items() if _equal(t, value)), None)
        if match is not None:
            del floats[match]
            continue
        index = next((i for i, (_, w, tol) in enumerate(quantised)
                      if w.shape == value.shape and bool(((w - value.float()).abs() <= tol).all())), None)  # fmt: skip
        if index is None:
            return f"parameter {name!r} {tuple(value.shape)} is not among its weights"
        quantised.pop(index)
    left = [*floats, *(sorted(names)[0] for names, _, _ in quantised)]
    return f"it holds weights the surrogate layer has not ({', '.join(left)})" if left else None


def _equal(stored: torch.Tensor, value: torch.Tensor) -> bool:
    if stored.dtype != value.dtype:
        return False
    if stored.shape == value.shape and torch.equal(stored, value):
        return True
    return value.dim() == 2 and stored.shape == value.T.shape and torch.equal(stored, value.T)


def check_layer_file(
    path: Path, slot: int, manifest: Manifest, directory: Path, layer: nn.Module | None = None
) -> None:
    """Refuse (`ArtifactError` naming the layer) a layer file of the export in `directory` that is not slot `slot`
    of it, or, given the surrogate `layer` module it must hold, one whose weights are not that layer's."""
    model = load_layer_model(path, f"layer {slot} file")
    where = f"layer {slot} file {str(path)!r}"
    external = [init.name for init in model.graph.initializer if init.data_location == _EXTERNAL]
    if external:
        raise ArtifactError(
            f"{where} keeps weights in external data files ({', '.join(external[:3])}), which kvzap-eval exports never "
            f"do and no manifest hash covers: {_fix(directory)}"
        )
    config = manifest.surrogate
    problems = graph_signature_problems(model.graph, manifest.dtype, config.input_dim, config.output_dim)
    if problems:
        raise ArtifactError(f"{where} does not match its manifest ({'; '.join(problems)}): {_fix(directory)}")
    stamped = {prop.key: prop.value for prop in model.metadata_props}.get(LAYER_METADATA_KEY)
    if stamped != str(slot):
        said = f"was exported as layer {stamped}" if stamped is not None else f"has no {LAYER_METADATA_KEY} metadata"
        raise ArtifactError(
            f"{where} {said}, not layer {slot}: the manifest's layer entries were swapped or edited; {_fix(directory)}"
        )
    if layer is None:
        return
    try:
        problem = weights_problem(model, layer, manifest.dtype)
    except (ValueError, RuntimeError) as exc:  # an initializer of a type or size no export of ours holds
        problem = f"its weights cannot be read ({exc})"
    if problem:
        raise ArtifactError(
            f"{where} does not hold layer {slot} of the surrogate in use ({problem}): the export was made from another "
            f"surrogate although its manifest names this one; {_fix(directory)}"
        )


def check_layer_files(
    manifest: Manifest, directory: Path, paths: list[Path], layers: list[nn.Module] | None = None
) -> None:
    """`check_layer_file` for every layer of the export in `directory` (`layers`: the surrogate's layer modules, when
    known: then each file's weights are checked too)."""
    for slot, path in enumerate(paths):
        check_layer_file(path, slot, manifest, directory, None if layers is None else layers[slot])
