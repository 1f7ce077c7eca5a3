"""Compression methods: a method is a scorer plus a policy, built from one `MethodConfig`.

| method        | scorer                 | policy                                   |
|---------------|------------------------|------------------------------------------|
| `kvzap`       | KVzap surrogate        | threshold tau, window, prefill + decode  |
| `kvzap_adakv` | KVzap surrogate        | fixed ratio per layer (AdaKV), prefill   |
| `random`      | uniform random         | fixed ratio per head, prefill            |
| `streaming`   | sinks + recency        | fixed ratio per head, prefill            |
| `snapkv`      | SnapKV window attention| fixed ratio per head, prefill            |
| `kvzip_plus`  | KVzip+ oracle (teacher)| fixed ratio per layer, or threshold; prefill only |
| `full`        | none                   | none (the compact cache holds everything)|
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backends import BACKENDS, make_backend
from .errors import ConfigError
from .model_info import num_kv_heads, placement
from .policies import FixedRatioPolicy, Policy, ThresholdPolicy, validate_ratio, validate_threshold
from .scorers import KVzapScorer, KVzipPlusScorer, RandomScorer, Scorer, SnapKVScorer, StreamingScorer

METHODS = ("kvzap", "kvzap_adakv", "full", "random", "streaming", "snapkv", "kvzip_plus")
FIXED_RATIO_METHODS = ("kvzap_adakv", "random", "streaming", "snapkv")
#: Methods that prune the prefill only (a question after the context and decoding run unpruned).
PREFILL_ONLY_METHODS = (*FIXED_RATIO_METHODS, "kvzip_plus")
#: Threshold used when neither the user nor the surrogate's training report gives one (the paper's Qwen3 value).
DEFAULT_THRESHOLD = -4.0


@dataclass
class MethodConfig:
    """Every setting of a compression method; fields that a method does not use are ignored by it."""

    method: str = "kvzap"
    threshold: float | None = None  # kvzap: log-score tau; None = the surrogate's recommended tau or -4
    window: int = 128  # kvzap: recent tokens never evicted
    decoding: bool = True  # kvzap: also prune at every decode step
    compression_ratio: float | None = None  # fixed-ratio methods: fraction of entries removed, in [0, 1)
    surrogate: str | None = None  # hub id or directory; None = kvpress naming rule (or the shipped one)
    model_type: str = "mlp"  # surrogate type for the naming rule: "linear" or "mlp"
    backend: str = "torch"  # scorer backend: torch, onnxruntime, tensorrt or cuda_graph
    backend_dir: str | None = None  # exported artifacts for onnxruntime/tensorrt; None = export to the cache once
    backend_threads: int | None = None  # onnxruntime intra-op threads; None = torch's thread count
    n_sink: int = 4  # streaming: attention sinks
    alpha: float = 0.2  # kvzap_adakv: fraction of each head's budget protected
    seed: int = 0  # random

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown scorer backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.model_type not in ("linear", "mlp"):
            raise ConfigError(f"model_type must be 'linear' or 'mlp', got {self.model_type!r}")
        if self.threshold is not None:
            self.threshold = validate_threshold(self.threshold)
        if self.method == "kvzip_plus" and self.compression_ratio is not None:
            self.compression_ratio = validate_ratio(self.compression_ratio)
        if self.method in FIXED_RATIO_METHODS:
            if self.compression_ratio is None:
                raise ConfigError(f"method {self.method!r} needs compression_ratio=<float in [0, 1)>, e.g. 0.67")
            self.compression_ratio = validate_ratio(self.compression_ratio)
        ThresholdPolicy(0.0, self.window)  # validates the window


@dataclass
class Method:
    """A built method, ready for `compress(model, method)`: `scorer` and `policy` are None for `full`."""

    config: MethodConfig
    scorer: Scorer | None
    policy: Policy | None


def build_method(model: torch.nn.Module, config: MethodConfig | None = None, tokenizer=None, **settings) -> Method:
    """Build the scorer and policy of a method for `model` (loads the surrogate for KVzap methods; the KVzip+
    oracle needs the `tokenizer` for its repeat prompt)."""
    config = config or MethodConfig(**settings)
    heads = num_kv_heads(model.config)
    name = config.method
    if name == "full":
        return Method(config, None, None)
    if name == "random":
        return Method(config, RandomScorer(heads, config.seed), FixedRatioPolicy(config.compression_ratio))
    if name == "streaming":
        return Method(config, StreamingScorer(heads, config.n_sink), FixedRatioPolicy(config.compression_ratio))
    if name == "snapkv":
        return Method(config, SnapKVScorer(), FixedRatioPolicy(config.compression_ratio))
    if name == "kvzip_plus":
        if tokenizer is None:
            raise ConfigError("method kvzip_plus needs the tokenizer: build_method(model, config, tokenizer=...)")
        if config.compression_ratio is not None:
            policy = FixedRatioPolicy(config.compression_ratio, scope="layer", alpha=config.alpha)
        else:
            threshold = config.threshold if config.threshold is not None else DEFAULT_THRESHOLD
            policy = ThresholdPolicy(threshold, config.window, decoding=False)
        return Method(config, KVzipPlusScorer(model, tokenizer), policy)
    surrogate = _load_checked_surrogate(model, config)
    backend = make_backend(config.backend, surrogate, placement(model), config.backend_dir, config.backend_threads)
    scorer = KVzapScorer(backend)
    if name == "kvzap_adakv":
        return Method(config, scorer, FixedRatioPolicy(config.compression_ratio, scope="layer", alpha=config.alpha))
    threshold = config.threshold if config.threshold is not None else default_threshold(surrogate.source)
    return Method(config, scorer, ThresholdPolicy(threshold, config.window, config.decoding))


def default_threshold(surrogate_source) -> float:
    """The tau recommended by a local surrogate's training report (about 3x compression), else -4."""
    from pathlib import Path

    from .training_report import recommended_threshold

    if surrogate_source is not None and Path(surrogate_source).is_dir():
        recommended = recommended_threshold(surrogate_source)
        if recommended is not None:
            return recommended
    return DEFAULT_THRESHOLD


def _load_checked_surrogate(model: torch.nn.Module, config: MethodConfig):
    from .surrogate import check_against_model, load_surrogate, resolve_surrogate_source

    source = resolve_surrogate_source(model.config, config.surrogate, config.model_type)
    surrogate = load_surrogate(source)
    check_against_model(surrogate.config, model.config)
    return surrogate
