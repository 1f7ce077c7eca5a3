"""The training report stored beside a trained surrogate (`training_report.json`), and the tau it recommends.

A report holds the model, the corpus provenance, the collection and training settings and timings, the held-out R²
(mean over layers and KV heads of the squared Pearson correlation, plus per layer and per head), the compression
ratio of each threshold on held-out prompts, and `recommended_threshold`, the tau that gives about 3x compression.
Its `probe` holds the training-time model's scores of a fixed random input, so a reloaded checkpoint can be checked
against the model that was trained.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_json_atomic

REPORT_NAME = "training_report.json"
PROBE_ROWS = 4
PROBE_SEED = 0


def write_report(directory: str | os.PathLike, report: dict[str, Any]) -> Path:
    """Write `report` as `training_report.json` in `directory`, atomically; returns the file's path."""
    directory = Path(directory)
    return write_json_atomic(directory / REPORT_NAME, report, indent=1)


def read_report(surrogate_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The training report of a local surrogate directory, or None when it has none (e.g. hub checkpoints)."""
    path = Path(surrogate_dir).expanduser() / REPORT_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def recommended_threshold(surrogate_dir: str | os.PathLike) -> float | None:
    """The tau that the surrogate's training report recommends (about 3x compression), or None if unknown."""
    report = read_report(surrogate_dir)
    value = None if report is None else report.get("recommended_threshold")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def probe_input(input_dim: int) -> torch.Tensor:
    """The fixed probe input: (PROBE_ROWS, input_dim) standard normal from `PROBE_SEED`, float32."""
    return torch.randn(PROBE_ROWS, input_dim, generator=torch.Generator().manual_seed(PROBE_SEED))


@torch.no_grad()
def probe_scores(surrogate: torch.nn.Module) -> list[list[list[float]]]:
    """Scores (n_layers, PROBE_ROWS, H_kv) of the probe input under every layer of a `KVzapSurrogate`, in float32."""
    x = probe_input(surrogate.config.input_dim)[None]
    return [surrogate(i, x)[0].T.float().tolist() for i in range(surrogate.config.n_modules)]
