"""Threshold calibration: the compression ratio that each tau gives on held-out prompts, and a recommended tau.

Each held-out text is prefilled once as a user turn (the model's chat template, or the plain text), the surrogate
scores every token from its post-norm hidden state, and the DMS prefill rule is applied for every tau at once:
tokens outside the last `window` ones are evicted where score < tau (strictly), per layer and KV head. The ratio
of a prompt is the mean over layers of evicted / (H_kv * tokens) — what `session.stats().achieved_compression_ratio`
reports after a prefill with `ThresholdPolicy(tau, window)` — and the table gives its mean over the prompts. The
recommended tau is the point of a fine grid whose mean ratio is closest to `target_ratio` (2/3, i.e. 3x compression).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..llm.model_info import attention_modules
from ..settings import DEFAULT_WINDOW
from ..surrogate import KVzapSurrogate

DEFAULT_THRESHOLDS = tuple(float(t) for t in range(-9, 0))  # -9 ... -1


@dataclass(frozen=True)
class CalibrationConfig:
    """Reported thresholds, DMS window, target compression ratio, and the step of the grid searched for it."""

    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    window: int = DEFAULT_WINDOW
    target_ratio: float = 2 / 3
    step: float = 0.25
    search: tuple[float, float] = (-16.0, 4.0)


def user_turn_ids(tokenizer: Any, text: str) -> torch.Tensor:
    """(1, T) ids of `text` as one user turn with the generation prompt (or the plain text without a template)."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(rendered, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return tokenizer(text, return_tensors="pt")["input_ids"]


@torch.inference_mode()
def surrogate_scores(
    model: torch.nn.Module, input_ids: torch.Tensor, surrogates: Mapping[str, KVzapSurrogate]
) -> dict[str, np.ndarray]:
    """One prefill of `input_ids` (1, T); each surrogate's scores of every token, (L, H_kv, T) float32."""
    scores: dict[str, list[np.ndarray]] = {name: [] for name in surrogates}

    def hook(module, args, kwargs, output):
        hidden = kwargs["hidden_states"].float()
        for name, surrogate in surrogates.items():
            scores[name].append(surrogate(module.layer_idx, hidden)[0].numpy())

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in attention_modules(model)]
    try:
        getattr(model, "base_model", model)(input_ids=input_ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: np.stack(s) for name, s in scores.items()}


def prefill_ratios(scores: np.ndarray, thresholds: Sequence[float], window: int) -> np.ndarray:
    """Compression ratio after one DMS prefill of scores (L, H, T), for each threshold."""
    n_layers, heads, length = scores.shape
    decided = scores[:, :, : max(0, length - window)].reshape(n_layers, -1)
    ratios = [(decided < tau).sum(1).mean() / (heads * length) for tau in thresholds]
    return np.asarray(ratios, dtype=np.float64)


@dataclass
class Calibration:
    """Mean compression ratio per threshold over the held-out prompts, and the recommended threshold."""

    table: list[dict[str, float]]
    recommended_threshold: float
    recommended_ratio: float
    n_prompts: int
    mean_tokens: float
    window: int
    target_ratio: float

    def to_json(self) -> dict[str, Any]:
        return {
            "method": "DMS prefill of held-out prompts as user turns (chat template), ratio = mean over layers",
            "window": self.window,
            "n_prompts": self.n_prompts,
            "mean_tokens": round(self.mean_tokens, 1),
            "target_ratio": round(self.target_ratio, 4),
            "table": self.table,
            "recommended_threshold": self.recommended_threshold,
            "recommended_ratio": round(self.recommended_ratio, 4),
        }


def calibrate(
    model: torch.nn.Module,
    tokenizer: Any,
    surrogates: Mapping[str, KVzapSurrogate],
    texts: Sequence[str],
    config: CalibrationConfig | None = None,
) -> dict[str, Calibration]:
    """Calibrate each surrogate on the held-out `texts` (see the module docstring)."""
    config = config or CalibrationConfig()
    lo, hi = config.search
    grid = np.round(np.arange(lo, hi + config.step / 2, config.step), 6)
    thresholds = np.concatenate([np.asarray(config.thresholds, dtype=np.float64), grid])
    sums = {name: np.zeros(len(thresholds)) for name in surrogates}
    lengths = []
    for text in texts:
        ids = user_turn_ids(tokenizer, text)
        lengths.append(ids.shape[1])
        for name, scores in surrogate_scores(model, ids, surrogates).items():
            sums[name] += prefill_ratios(scores, thresholds, config.window)
    results = {}
    n = max(1, len(texts))
    for name, total in sums.items():
        mean = total / n
        table = [
            {"threshold": float(t), "compression_ratio": round(float(r), 4)}
            for t, r in zip(config.thresholds, mean[: len(config.thresholds)])
        ]
        fine = mean[len(config.thresholds) :]
        best = int(np.argmin(np.abs(fine - config.target_ratio)))
        results[name] = Calibration(
            table,
            float(grid[best]),
            float(fine[best]),
            len(texts),
            float(np.mean(lengths)) if lengths else 0.0,
            config.window,
            config.target_ratio,
        )
    return results
