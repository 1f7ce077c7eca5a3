"""Compression methods: a method is a scorer plus a policy, built from one `MethodConfig`.

`MethodConfig` owns the rules of the settings for every entry point (the Python API, lm-eval's `kvzap_hf`, `kvzap-eval
sweep`): which method takes which setting (`METHOD_SETTINGS`), their defaults, and how values are checked.

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

from collections.abc import Iterable
from dataclasses import dataclass, fields

import torch

from ..errors import ConfigError
from ..llm.model_info import ModelShape, check_supported, num_kv_heads, placement
from ..settings import (
    DEFAULT_THRESHOLD,
    DEFAULT_WINDOW,
    as_bool,
    as_choice,
    as_number,
    as_text,
    as_whole_number,
    validate_ratio,
    validate_threshold,
)
from .backends import BACKENDS, make_backend
from .policies import FixedRatioPolicy, Policy, ThresholdPolicy
from .scorers import KVzapScorer, KVzipPlusScorer, RandomScorer, Scorer, SnapKVScorer, StreamingScorer

METHODS = ("kvzap", "kvzap_adakv", "full", "random", "streaming", "snapkv", "kvzip_plus")
FIXED_RATIO_METHODS = ("kvzap_adakv", "random", "streaming", "snapkv")
#: Methods that prune the prefill only (a question after the context and decoding run unpruned).
PREFILL_ONLY_METHODS = (*FIXED_RATIO_METHODS, "kvzip_plus")
SURROGATE_TYPES = ("linear", "mlp")

# --- which settings apply to which method: the one rule every entry point (Python, kvzap_hf, sweep) goes through --
SURROGATE_SETTINGS = ("surrogate", "model_type", "backend", "backend_dir", "backend_threads")
#: The settings each method takes; any other setting given with it is refused.
METHOD_SETTINGS: dict[str, tuple[str, ...]] = {
    "kvzap": ("threshold", "window", "decoding", *SURROGATE_SETTINGS),
    "kvzap_adakv": ("compression_ratio", "alpha", *SURROGATE_SETTINGS),
    "random": ("compression_ratio", "seed"),
    "streaming": ("compression_ratio", "n_sink"),
    "snapkv": ("compression_ratio",),
    "kvzip_plus": ("compression_ratio", "alpha", "threshold", "window"),
    "full": (),
}
#: kvzip_plus runs one of two policies, chosen by whether compression_ratio is given; each takes its own settings.
KVZIP_PLUS_POLICIES = {"fixed-ratio (AdaKV)": ("compression_ratio", "alpha"), "threshold": ("threshold", "window")}
#: Scorer backends that take the export settings (the others use neither).
BACKEND_SETTINGS = {"onnxruntime": ("backend_dir", "backend_threads"), "tensorrt": ("backend_dir",)}
#: Values of the settings a method takes but that were not given.
DEFAULTS = {"window": DEFAULT_WINDOW, "decoding": True, "model_type": "mlp", "backend": "torch", "n_sink": 4,
            "alpha": 0.2, "seed": 0}  # fmt: skip
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range


def settings_taken(method: str, given: Iterable[str] = ()) -> tuple[str, ...]:
    """The settings `method` takes, `given` being the names set alongside it (kvzip_plus: its policy's only)."""
    if method != "kvzip_plus":
        return METHOD_SETTINGS[method]
    policy = "fixed-ratio (AdaKV)" if "compression_ratio" in set(given) else "threshold"
    return KVZIP_PLUS_POLICIES[policy]


def applicable(method: str, settings: dict) -> dict:
    """The entries of `settings` that `method` takes, `method` kept: what to pass to `MethodConfig` from settings
    shared by several methods (a sweep's `--model-args`). Values are not checked here: `MethodConfig` does that."""
    taken = settings_taken(method, settings)
    return {name: value for name, value in settings.items() if name in taken or name == "method"}


def _refuse_not_taken(method: str, given: list[str]) -> None:
    taken = settings_taken(method, given)
    extra = [name for name in given if name not in taken]
    if not extra:
        return
    takers = {name: [m for m, names in METHOD_SETTINGS.items() if name in names] for name in extra}
    where = "; ".join(f"{name} is for {', '.join(methods)}" for name, methods in takers.items())
    if method == "kvzip_plus":
        takes = "compression_ratio (+ alpha) for its AdaKV policy, or threshold (+ window) for its threshold policy"
    else:
        takes = ", ".join(taken) or "no settings"
    raise ConfigError(f"method {method} does not take {', '.join(extra)} ({where}): it takes {takes}")


def _refuse_export_settings(backend: str, given: list[str]) -> None:
    for name in ("backend_dir", "backend_threads"):
        if name in given and name not in BACKEND_SETTINGS.get(backend, ()):
            users = [b for b, names in BACKEND_SETTINGS.items() if name in names]
            raise ConfigError(
                f"{name} does not apply to scorer backend {backend}: it is for backend={' or '.join(users)}"
            )


def _model_type(value) -> str:
    if value not in SURROGATE_TYPES:
        raise ConfigError(f"model_type must be 'linear' or 'mlp', got {value!r}")
    return value


def _not_bool(name: str, check):
    """`check`, refusing booleans first (float(True) would pass as 1.0)."""

    def checked(value):
        if isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be a number, not true/false")
        return check(value)

    return checked


#: How each setting's value is checked (and coerced from a string).
SETTING_CHECKS = {
    "threshold": _not_bool("threshold", validate_threshold),
    "window": lambda v: as_whole_number("window", v, 0),
    "decoding": lambda v: as_bool("decoding", v),
    "compression_ratio": _not_bool("compression_ratio", validate_ratio),
    "surrogate": lambda v: as_text("surrogate", v),
    "model_type": _model_type,
    "backend": lambda v: as_choice("backend", v, BACKENDS, "scorer backend"),
    "backend_dir": lambda v: as_text("backend_dir", v),
    "backend_threads": lambda v: as_whole_number("backend_threads", v, 1),
    "n_sink": lambda v: as_whole_number("n_sink", v, 0),
    "alpha": lambda v: as_number("alpha", v, 0.0, 1.0),
    "seed": lambda v: as_whole_number("seed", v, 0, MAX_SEED),
}


def check_setting(name: str, value):
    """The checked (and coerced) value of one method setting; `method` itself is checked by `MethodConfig`."""
    if name == "method":
        return as_choice("method", value, METHODS, "method")
    return SETTING_CHECKS[name](value)


@dataclass
class MethodConfig:
    """Every setting of a compression method (`METHOD_SETTINGS` says which method takes which).

    None means "not given": a setting the method takes gets its default (`DEFAULTS`), one it does not take stays
    None, and giving a setting the method does not take is an error. Values are checked and coerced here ("3" -> 3,
    "no" -> False), so the Python API, `kvzap_hf` and `kvzap-eval sweep` accept exactly the same settings.
    """

    method: str = "kvzap"
    threshold: float | None = None  # kvzap, kvzip_plus: log-score tau; None = the surrogate's recommended tau or -4
    window: int | None = None  # kvzap, kvzip_plus (threshold): recent tokens never evicted (128)
    decoding: bool | None = None  # kvzap: also prune at every decode step (True)
    compression_ratio: float | None = None  # fixed-ratio methods, kvzip_plus: fraction of entries removed, [0, 1)
    surrogate: str | None = None  # kvzap methods: hub id or directory; None = kvpress naming rule (or the shipped one)
    model_type: str | None = None  # kvzap methods: surrogate type for the naming rule, "linear" or "mlp" ("mlp")
    backend: str | None = None  # kvzap methods: torch, onnxruntime, tensorrt or cuda_graph ("torch")
    backend_dir: str | None = None  # onnxruntime/tensorrt: exported artifacts; None = export to the cache once
    backend_threads: int | None = None  # onnxruntime: intra-op threads; None = torch's thread count
    n_sink: int | None = None  # streaming: attention sinks (4)
    alpha: float | None = None  # kvzap_adakv, kvzip_plus (ratio): fraction of each head's budget protected (0.2)
    seed: int | None = None  # random (0)

    def __post_init__(self) -> None:
        self.method = check_setting("method", self.method)
        given = [f.name for f in fields(self) if f.name != "method" and getattr(self, f.name) is not None]
        self._given = frozenset(given)  # not a field: what the caller set, before defaults
        _refuse_not_taken(self.method, given)
        for name in given:
            setattr(self, name, check_setting(name, getattr(self, name)))
        if "backend" in settings_taken(self.method, given):
            _refuse_export_settings(self.backend or DEFAULTS["backend"], given)
        if self.method in FIXED_RATIO_METHODS and self.compression_ratio is None:
            raise ConfigError(f"method {self.method!r} needs compression_ratio=<float in [0, 1)>, e.g. 0.67")
        for name in settings_taken(self.method, given):
            if getattr(self, name) is None and name in DEFAULTS:
                setattr(self, name, DEFAULTS[name])

    def was_given(self, name: str) -> bool:
        """Whether the caller set `name` (rather than it taking its default)."""
        return name in getattr(self, "_given", ())

    def active_settings(self) -> dict:
        """The settings this method runs with, `method` included (defaults applied, the ones it does not take left
        out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass
class Method:
    """A built method, ready for `compress(model, method)`: `scorer` and `policy` are None for `full`.

    `built_for` is the shape of the model it was built for (None: not recorded); `compress` refuses another one.
    """

    config: MethodConfig
    scorer: Scorer | None
    policy: Policy | None
    built_for: ModelShape | None = None

    @property
    def prefill_only(self) -> bool:
        """True when the method prunes the prefill only (`PREFILL_ONLY_METHODS`): a question after the context and
        the decoding steps run against the pruned cache without pruning it further."""
        return self.config.method in PREFILL_ONLY_METHODS


#: Methods whose scorer is bound to each layer's device and dtype when built (a surrogate backend).
PLACED_METHODS = ("kvzap", "kvzap_adakv")


def build_method(model: torch.nn.Module, config: MethodConfig | None = None, tokenizer=None, **settings) -> Method:
    """Build the scorer and policy of a method for `model` (loads the surrogate for KVzap methods; the KVzip+
    oracle needs the `tokenizer` for its repeat prompt)."""
    if config is not None and settings:
        raise ConfigError(f"give either a MethodConfig or settings ({', '.join(settings)}), not both")
    config = config or MethodConfig(**settings)
    check_supported(model)
    shape = ModelShape.of(model, with_placement=config.method in PLACED_METHODS)
    scorer, policy = _scorer_and_policy(model, config, tokenizer)
    return Method(config, scorer, policy, shape)


def _scorer_and_policy(model: torch.nn.Module, config: MethodConfig, tokenizer) -> tuple[Scorer | None, Policy | None]:
    heads = num_kv_heads(model.config)
    name = config.method
    if name == "full":
        return None, None
    if name == "random":
        return RandomScorer(heads, config.seed), FixedRatioPolicy(config.compression_ratio)
    if name == "streaming":
        return StreamingScorer(heads, config.n_sink), FixedRatioPolicy(config.compression_ratio)
    if name == "snapkv":
        return SnapKVScorer(), FixedRatioPolicy(config.compression_ratio)
    if name == "kvzip_plus":
        if tokenizer is None:
            raise ConfigError("method kvzip_plus needs the tokenizer: build_method(model, config, tokenizer=...)")
        if config.compression_ratio is not None:
            policy = FixedRatioPolicy(config.compression_ratio, scope="layer", alpha=config.alpha)
        else:
            threshold = config.threshold if config.threshold is not None else DEFAULT_THRESHOLD
            policy = ThresholdPolicy(threshold, config.window, decoding=False)
        return KVzipPlusScorer(model, tokenizer), policy
    surrogate = _load_checked_surrogate(model, config)
    backend = make_backend(config.backend, surrogate, placement(model), config.backend_dir, config.backend_threads)
    scorer = KVzapScorer(backend)
    if name == "kvzap_adakv":
        return scorer, FixedRatioPolicy(config.compression_ratio, scope="layer", alpha=config.alpha)
    threshold = config.threshold if config.threshold is not None else default_threshold(surrogate.source)
    return scorer, ThresholdPolicy(threshold, config.window, config.decoding)


def default_threshold(surrogate_source) -> float:
    """The tau recommended by a local surrogate's training report (about 3x compression), else -4."""
    from pathlib import Path

    from ..surrogate.report import recommended_threshold

    if surrogate_source is not None and Path(surrogate_source).is_dir():
        recommended = recommended_threshold(surrogate_source)
        if recommended is not None:
            return recommended
    return DEFAULT_THRESHOLD


def _load_checked_surrogate(model: torch.nn.Module, config: MethodConfig):
    from ..surrogate import check_against_model, load_surrogate, resolve_surrogate_source

    source = resolve_surrogate_source(model.config, config.surrogate, config.model_type)
    surrogate = load_surrogate(source)
    check_against_model(surrogate.config, model.config)
    if config.surrogate is not None and config.was_given("model_type") and surrogate.model_type != config.model_type:
        raise ConfigError(
            f"surrogate {config.surrogate!r} is of type {surrogate.model_type}, but model_type={config.model_type}: "
            "give a surrogate of that type, or leave model_type out"
        )
    return surrogate
