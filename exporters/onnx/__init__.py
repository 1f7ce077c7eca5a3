"""ONNX export of KVzap surrogates: `main_export` (the library function), `validate_export` (its own step) and
`python -m exporters.onnx` (the CLI)."""

from .export import (
    ExportResult,
    OnnxExportConfig,
    default_export_dir,
    export_layers,
    main_export,
    trace_layer,
)
from .validate import (
    TOLERANCES,
    ExportValidationError,
    LayerValidation,
    OutputCheck,
    validate_export,
)

__all__ = [
    "TOLERANCES",
    "ExportResult",
    "ExportValidationError",
    "LayerValidation",
    "OnnxExportConfig",
    "OutputCheck",
    "default_export_dir",
    "export_layers",
    "main_export",
    "trace_layer",
    "validate_export",
]
