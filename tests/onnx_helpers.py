"""Shared pieces of the ONNX/ORT tests: tiny checkpoints in the hub layout (the shared export: conftest's
`tiny_export`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvzap_eval.surrogate import save_surrogate

from .conftest import surrogate_for, tiny_model


def checkpoint(tmp: Path, model_type: str = "mlp", seed: int = 1, **overrides) -> tuple[object, object, Path]:
    """(tiny LLM, its surrogate, the surrogate saved in the hub layout under `tmp`)."""
    model = tiny_model(**overrides)
    surrogate = surrogate_for(model, model_type, seed=seed)
    return model, surrogate, save_surrogate(surrogate, tmp / f"KVzap-{model_type}-tiny-{seed}")


def needs_onnx() -> None:
    for module in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(module)
