"""Export a KVzap surrogate to one ONNX file per layer plus a manifest; the library behind `python -m exporters.onnx`.

Each layer is exported on its own with `torch.onnx.export(dynamo=True, opset_version=20, external_data=False)`:
input `hidden_states` [batch, sequence, D] -> output `scores` [batch, sequence, H_kv], in the export dtype, with
named dynamic batch and sequence dims and no external-data side files. The output is left in the surrogate's own
(B, T, H_kv) layout: backends return it as a (B, H_kv, T) view, as the torch backend does, instead of paying for a
Transpose node on every call. Node metadata that torch records (stack
traces with local paths) is dropped, so the same weights give byte-identical files on every machine, and the
file hash can key engine caches. All layers share one architecture, so layer 0 is traced and the other files are
its graph with their own weights swapped in (each initializer matched by value to exactly one parameter; when that
match is not unique every layer is traced). Validation runs on every file after export and is fatal unless
`allow_mismatch`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from kvzap_eval.errors import require
from kvzap_eval.settings import DEFAULT_THRESHOLD, validate_threshold
from kvzap_eval.surrogate import KVzapSurrogate

from ..dtypes import EXPORT_DTYPES, WEIGHT_ONLY_BITS, parse_dtype
from ..hidden_states import hidden_states_for
from ..manifest import (
    INPUT_NAME,
    LAYER_METADATA_KEY,
    MANIFEST_NAME,
    OPSET,
    OUTPUT_NAME,
    LayerArtifact,
    Manifest,
    layer_file_name,
    write_manifest,
)
from ..output import writable_directory
from ..source import SourceInfo, file_sha256, load_source
from .validate import ExportValidationError, LayerValidation, validate_export

_LAYER_FILE = re.compile(r"layer_\d+\.onnx")


@dataclass(frozen=True)
class OnnxExportConfig:
    """Settings of an export.

    dtype: fp32, fp16 or bf16 (weights, input and output). threshold: tau for the keep/evict agreement check.
    validate / allow_mismatch: run validation / keep the export although it failed. hidden_states_model: LLM
    whose hidden states validate the export ("auto" = embedded SmolLM2 when shapes match, None = random only).
    revision: hub revision of a hub-id source.
    """

    dtype: str = "fp32"
    threshold: float = DEFAULT_THRESHOLD
    validate: bool = True
    allow_mismatch: bool = False
    hidden_states_model: str | None = "auto"
    revision: str | None = None


@dataclass
class ExportResult:
    """Where the export went, its manifest, and the validation report of each layer (empty when skipped)."""

    directory: Path
    manifest: Manifest
    reports: list[LayerValidation] = field(default_factory=list)


class LayerGraph(nn.Module):
    """The exported function of one layer: hidden states (B, T, D) -> scores (B, T, H_kv)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.layer(hidden_states)


def default_export_dir(weights_sha256: str, dtype: str) -> Path:
    """The cache directory of an export: `<kvzap-eval cache>/onnx/<weights fingerprint>-<dtype>`."""
    from kvzap_eval.llm.embedded import embedded_cache_dir

    return embedded_cache_dir() / "onnx" / f"{weights_sha256[:24]}-{parse_dtype(dtype)}"


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the dynamo exporter's warnings and progress logging (torchvision absent, deprecations...)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def _strip_metadata(model) -> None:
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.metadata_props[:]
    model.graph.doc_string = ""
    model.doc_string = ""


def trace_layer(layer: nn.Module, dtype: str, input_dim: int):
    """The ONNX `ModelProto` of one layer module, traced by `torch.onnx.export` (dynamo, opset 20, no metadata)."""
    require("onnx", "onnx")
    require("onnxscript", "onnx")
    torch_dtype = EXPORT_DTYPES[parse_dtype(dtype)]
    graph = LayerGraph(copy.deepcopy(layer).to(torch_dtype)).eval().requires_grad_(False)
    example = torch.zeros(2, 3, input_dim, dtype=torch_dtype)  # sizes > 1: dims of size 1 would be specialised
    with _quiet_exporter():
        program = torch.onnx.export(
            graph,
            (example,),
            dynamo=True,
            opset_version=OPSET,
            external_data=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"hidden_states": {0: "batch", 1: "sequence"}},
            verbose=False,
            report=False,
        )
    model = program.model_proto
    _strip_metadata(model)
    model.producer_name, model.producer_version = "kvzap-eval", _version("kvzap-eval")
    return model


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    """The little-endian bytes of a float tensor (bf16 included, which numpy cannot hold)."""
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.detach().cpu().contiguous().view(as_int).numpy().tobytes()


def _weights(layer: nn.Module, dtype: str) -> dict[str, torch.Tensor]:
    return {k: v.to(EXPORT_DTYPES[dtype]) for k, v in layer.state_dict().items()}


def match_initializers(model, layer: nn.Module, dtype: str) -> dict[str, tuple[str, bool]] | None:
    """initializer name -> (parameter name, transposed) for the layer `model` was traced from, or None unless every
    initializer equals exactly one parameter (or its transpose) and every parameter is used."""
    params = _weights(layer, dtype)
    candidates = {(name, t): _raw_bytes(v.T if t else v) for name, v in params.items() for t in (False, True)
                  if v.dim() == 2 or not t}  # fmt: skip
    mapping = {}
    for init in model.graph.initializer:
        if not init.raw_data:
            return None
        found = [key for key, data in candidates.items() if data == init.raw_data
                 and list(init.dims) == list((params[key[0]].T if key[1] else params[key[0]]).shape)]  # fmt: skip
        if len(found) != 1:
            return None
        mapping[init.name] = found[0]
    return mapping if {name for name, _ in mapping.values()} == set(params) else None


def with_weights(template, mapping: dict[str, tuple[str, bool]], layer: nn.Module, dtype: str):
    """A copy of the traced `template` carrying `layer`'s weights (same module type and shapes)."""
    model = type(template)()
    model.CopyFrom(template)
    params = _weights(layer, dtype)
    for init in model.graph.initializer:
        name, transposed = mapping[init.name]
        init.raw_data = _raw_bytes(params[name].T if transposed else params[name])
    return model


def save_layer(model, path: Path, layer_idx: int) -> str:
    """Save one layer's model (no external data), check it with `onnx.checker`; returns the file's SHA-256."""
    import onnx

    del model.metadata_props[:]
    model.metadata_props.add(key=LAYER_METADATA_KEY, value=str(layer_idx))
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return file_sha256(path)


def quantize_weights(model, bits: int):
    """Weight-only quantization of every MatMul (onnxruntime `MatMulNBits`, symmetric blocks of 32)."""
    require("onnxruntime", "onnx")
    root = logging.getLogger()
    handlers, root_level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root.handlers[:], root.level = handlers, root_level  # its import calls logging.basicConfig: undo that

    original, model = model, type(model)()
    model.CopyFrom(original)  # the quantizer rewrites the graph it is given
    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=32, is_symmetric=True, accuracy_level=4)
        quantizer.process()
    finally:
        quiet.setLevel(level)
    return quantizer.model.model


def export_layers(surrogate: KVzapSurrogate, directory: Path, dtype: str) -> list[LayerArtifact]:
    """Write `layer_XX.onnx` for every layer: layer 0 is traced, the others reuse its graph with their own weights
    (all layers share one architecture); if layer 0's weights cannot be matched one to one, each layer is traced.
    Weight-only dtypes are traced in fp32 and quantized afterwards."""
    dim = surrogate.config.input_dim
    bits = WEIGHT_ONLY_BITS.get(dtype)
    traced = "fp32" if bits else dtype
    template = trace_layer(surrogate.layers[0], traced, dim)
    mapping = match_initializers(template, surrogate.layers[0], traced)
    artifacts = []
    for i, layer in enumerate(surrogate.layers):
        if i == 0:
            model = template
        elif mapping is not None:
            model = with_weights(template, mapping, layer, traced)
        else:
            model = trace_layer(layer, traced, dim)
        if bits:
            model = quantize_weights(model, bits)
        path = directory / layer_file_name(i)
        artifacts.append(LayerArtifact(i, path.name, save_layer(model, path, i)))
    return artifacts


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def _versions() -> dict[str, str]:
    return {name: _version(name) for name in ("kvzap-eval", "torch", "onnx", "onnxscript", "onnxruntime")}


def _prepare(directory: Path) -> None:
    """Create `directory` (`ConfigError` if it is a file or not writable), and remove a previous manifest and layer
    files so a partial export never looks whole."""
    writable_directory(directory, "--out")
    (directory / MANIFEST_NAME).unlink(missing_ok=True)
    for path in directory.iterdir():
        if _LAYER_FILE.fullmatch(path.name):
            path.unlink()


def _validate(
    surrogate: KVzapSurrogate,
    paths: list[Path],
    states: tuple[list[torch.Tensor] | None, str],
    dtype: str,
    tau: float,
    log: Callable[[str], None],
) -> tuple[list[LayerValidation], list[str]]:
    hidden_states, description = states
    log(f"validating {len(paths)} layers ({dtype}, tau={tau}); real hidden states: {description}")
    reports = validate_export(paths, surrogate, dtype, tau, hidden_states, "real")
    labels = [check.inputs for check in reports[0].checks] if reports else []
    labels.append(f"{'real' if hidden_states is not None else 'no real'} hidden states: {description}")
    return reports, labels


def main_export(
    source: str | os.PathLike | KVzapSurrogate,
    out_dir: str | os.PathLike | None = None,
    config: OnnxExportConfig | None = None,
    *,
    log: Callable[[str], None] | None = None,
    **settings,
) -> ExportResult:
    """Export `source` (hub id, checkpoint directory or in-memory surrogate) to `out_dir`, validate, write the manifest.

    `out_dir` None uses `default_export_dir` (where backends look when given no artifact directory). Settings are
    `OnnxExportConfig` fields. Every setting, the output directory, the source and the hidden-states model are
    checked before the first layer is exported. Raises `ExportValidationError` when validation fails (the layer
    files stay, without a manifest) unless `allow_mismatch`; `ConfigError` for an unknown dtype, a bad threshold, an
    `out_dir` that is a file or not writable, or a hidden-states model that cannot be loaded; `CheckpointError` for
    a source that does not exist or does not load.
    """
    config = config or OnnxExportConfig(**settings)
    log = log or (lambda message: print(message, file=sys.stderr))
    dtype = parse_dtype(config.dtype)
    threshold = validate_threshold(config.threshold)
    if out_dir is not None:
        writable_directory(out_dir, "--out", create=False)  # before loading anything: a wrong --out fails at once
    surrogate, info = load_source(source, config.revision)
    # the LLM whose hidden states validate the export is loaded before the export, so a wrong name fails at once
    states = hidden_states_for(surrogate.config, config.hidden_states_model) if config.validate else (None, "")
    directory = Path(out_dir) if out_dir is not None else default_export_dir(info.weights_sha256, dtype)
    _prepare(directory)
    n = surrogate.config.n_modules
    log(f"exporting {n} {surrogate.model_type} layers of {info.id!r} to {directory} ({dtype}, opset {OPSET})")
    layers = export_layers(surrogate, directory, dtype)
    manifest = Manifest(info, surrogate.config, dtype, threshold, layers, versions=_versions())
    reports: list[LayerValidation] = []
    if config.validate:
        paths = [directory / a.file for a in layers]
        reports, manifest.validation_inputs = _validate(surrogate, paths, states, dtype, threshold, log)
        for artifact, report in zip(layers, reports):
            artifact.validation = report.to_json()
        failed = [r for r in reports if not r.passed]
        manifest.validation = "passed" if not failed else "failed (allowed)"
        if failed and not config.allow_mismatch:
            summary = f"{len(failed)} of {n} layers failed validation, first {failed[0].summary()}"
            raise ExportValidationError(
                f"{summary}; the ONNX files are left in {str(directory)!r} without a manifest (--allow-mismatch keeps "
                "the export anyway)",
                summary=summary,
            )
        if failed:
            log(f"warning: {len(failed)} layers failed validation, kept because of allow_mismatch")
    write_manifest(manifest, directory)
    return ExportResult(directory, manifest, reports)


__all__ = [
    "ExportResult",
    "LayerGraph",
    "OnnxExportConfig",
    "SourceInfo",
    "default_export_dir",
    "export_layers",
    "main_export",
    "trace_layer",
]  # fmt: skip
