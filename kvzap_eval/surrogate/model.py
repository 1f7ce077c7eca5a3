"""The KVzap surrogate: one Linear or Linear-GELU-Linear scorer per decoder layer, and its shape config.

Each scorer reads the post-`input_layernorm` hidden state (B, T, D) that the decoder layer passes to `self_attn`
and predicts, per KV head, the log KVzip+ score of every token: output (B, H_kv, T), higher = keep.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError

SURROGATE_TYPES = ("linear", "mlp")
_REQUIRED_KEYS = ("input_dim", "output_dim", "n_modules")


def _check_model_type(model_type: str) -> str:
    if model_type not in SURROGATE_TYPES:
        raise ConfigError(f"surrogate type {model_type!r} is unknown: use 'linear' or 'mlp'")
    return model_type


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"surrogate {name}={value!r} must be a positive integer")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ConfigError(f"dtype {dtype!r} is not a torch floating-point dtype: use e.g. 'float32' or 'bfloat16'")
    return resolved


@dataclass(frozen=True)
class SurrogateConfig:
    """Shapes of a KVzap surrogate: `n_modules` per-layer scorers from `input_dim` to `output_dim`.

    `hidden_dim` None means a linear scorer; otherwise an MLP `Linear -> GELU -> Linear` of that width.
    """

    input_dim: int
    output_dim: int
    n_modules: int
    hidden_dim: int | None = None

    def __post_init__(self) -> None:
        _positive_int("input_dim", self.input_dim)
        _positive_int("output_dim", self.output_dim)
        _positive_int("n_modules", self.n_modules)
        if self.hidden_dim is not None:
            _positive_int("hidden_dim", self.hidden_dim)

    @property
    def model_type(self) -> str:
        """`"linear"` or `"mlp"`."""
        return "linear" if self.hidden_dim is None else "mlp"

    def to_json_dict(self, dtype: torch.dtype | str = torch.float32) -> dict[str, Any]:
        """The `config.json` content, in the layout kvpress writes (`dtype` = dtype of the saved tensors)."""
        d: dict[str, Any] = {
            "architectures": ["KVzapModel"],
            "model_type": "kvzap",
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "hidden_dim": self.hidden_dim,
            "n_modules": self.n_modules,
            "dtype": _dtype_name(_as_dtype(dtype)),
        }
        try:
            d["transformers_version"] = metadata.version("transformers")
        except metadata.PackageNotFoundError:
            pass
        return d

    @classmethod
    def from_json_dict(cls, d: Mapping[str, Any], path: str | os.PathLike | None = None) -> SurrogateConfig:
        """Read the needed keys of a `config.json` dict (extra keys are ignored).

        Raises `CheckpointError` naming the missing keys and `path` when keys are missing or invalid.
        """
        where = f"surrogate config {str(path)!r}" if path is not None else "surrogate config"
        missing = [k for k in _REQUIRED_KEYS if k not in d]
        if missing:
            raise CheckpointError(
                f"{where} lacks key(s) {', '.join(missing)}: it must hold input_dim, output_dim, n_modules "
                "and hidden_dim (null for linear)"
            )
        model_type = d.get("model_type", "kvzap")
        if model_type != "kvzap":
            raise CheckpointError(f"{where} has model_type {model_type!r}, not 'kvzap': this is not a KVzap surrogate")
        try:
            return cls(
                input_dim=d["input_dim"],
                output_dim=d["output_dim"],
                n_modules=d["n_modules"],
                hidden_dim=d.get("hidden_dim"),
            )
        except ConfigError as exc:
            raise CheckpointError(f"{where}: {exc}") from None


def expected_tensor_shapes(config: SurrogateConfig) -> dict[str, tuple[int, ...]]:
    """The exact safetensors keys of a checkpoint for `config`, with their shapes."""
    D, H, hidden = config.input_dim, config.output_dim, config.hidden_dim
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(config.n_modules):
        if hidden is None:
            shapes[f"layers.{i}.weight"] = (H, D)
            shapes[f"layers.{i}.bias"] = (H,)
        else:
            shapes[f"layers.{i}.0.weight"] = (hidden, D)
            shapes[f"layers.{i}.0.bias"] = (hidden,)
            shapes[f"layers.{i}.2.weight"] = (H, hidden)
            shapes[f"layers.{i}.2.bias"] = (H,)
    return shapes


class KVzapSurrogate(nn.Module):
    """One scorer per decoder layer; `state_dict()` keys are exactly the hub layout."""

    def __init__(self, config: SurrogateConfig):
        super().__init__()
        self.config = config
        #: Where the weights came from (hub id or directory), for error messages; None when built in memory.
        self.source: str | None = None
        D, H, hidden = config.input_dim, config.output_dim, config.hidden_dim
        if hidden is None:
            layers = [nn.Linear(D, H) for _ in range(config.n_modules)]
        else:
            layers = [
                nn.Sequential(nn.Linear(D, hidden), nn.GELU(approximate="none"), nn.Linear(hidden, H))
                for _ in range(config.n_modules)
            ]
        self.layers = nn.ModuleList(layers)

    @property
    def model_type(self) -> str:
        """`"linear"` or `"mlp"`."""
        return self.config.model_type

    def forward(self, layer_idx: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """Log-scores of layer `layer_idx`: hidden states (B, T, D) -> (B, H_kv, T)."""
        return self.layers[layer_idx](hidden_states).transpose(1, 2)


def _model_name(model_config: Any) -> str | None:
    return getattr(model_config, "name_or_path", None) or getattr(model_config, "_name_or_path", None) or None


def _text_config(model_config: Any) -> Any:
    get = getattr(model_config, "get_text_config", None)
    return get() if callable(get) else model_config


def _model_dims(model_config: Any) -> dict[str, tuple[str, int]]:
    """surrogate field -> (model attribute, value) for input_dim, output_dim and n_modules."""
    cfg = _text_config(model_config)

    def attr(*names: str) -> tuple[str, int]:
        for n in names:
            value = getattr(cfg, n, None)
            if value is not None:
                return n, int(value)
        raise ConfigError(f"the model config has no {names[0]}: cannot size or check a KVzap surrogate for it")

    return {
        "input_dim": attr("hidden_size"),
        "output_dim": attr("num_key_value_heads", "num_attention_heads"),
        "n_modules": attr("num_hidden_layers"),
    }


def check_hidden_dim(hidden_dim: int | None, model_type: str = "mlp") -> None:
    """A one-line `ConfigError` unless `hidden_dim` is None or a whole number >= 1 for an MLP surrogate."""
    if hidden_dim is None:
        return
    if model_type != "mlp" or isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim < 1:
        raise ConfigError(
            f"hidden_dim={hidden_dim!r}: an MLP surrogate's hidden width is a whole number >= 1 (e.g. --hidden-dim 72);"
            " a linear surrogate has none"
        )


def surrogate_config_for(model_config: Any, model_type: str = "mlp", hidden_dim: int | None = None) -> SurrogateConfig:
    """The surrogate shapes for an LLM config (MLP hidden width `hidden_dim`, by default hidden_size // 8 as kvpress
    trains them; a linear surrogate has none)."""
    _check_model_type(model_type)
    check_hidden_dim(hidden_dim, model_type)
    dims = {field: value for field, (_, value) in _model_dims(model_config).items()}
    hidden = (hidden_dim or max(1, dims["input_dim"] // 8)) if model_type == "mlp" else None
    return SurrogateConfig(hidden_dim=hidden, **dims)


def check_against_model(
    surrogate: SurrogateConfig | KVzapSurrogate, model_config: Any, *, surrogate_name: str | None = None
) -> None:
    """Raise `CheckpointError` (one line, every mismatch, both sides named) unless the surrogate fits the LLM."""
    if isinstance(surrogate, KVzapSurrogate):
        surrogate_name = surrogate_name or surrogate.source
        surrogate = surrogate.config
    mismatches = []
    for field, (attr, value) in _model_dims(model_config).items():
        mine = getattr(surrogate, field)
        if mine != value:
            mismatches.append(f"surrogate {field}={mine} does not match the model's {attr}={value}")
    if mismatches:
        raise CheckpointError(
            f"{'; '.join(mismatches)} (surrogate {surrogate_name or '<in memory>'!r}, "
            f"model {_model_name(model_config) or '<unnamed>'!r}): use a surrogate trained for this model"
        )


def random_surrogate(
    model_config: Any,
    model_type: str = "mlp",
    seed: int = 0,
    scale: float = 1.0,
    score_offset: float = 0.0,
) -> KVzapSurrogate:
    """A randomly initialised surrogate shaped for the LLM (for tests and benchmarks), in eval mode.

    Scores are `scale * f(h) + score_offset`, `f` being torch's default initialisation under `seed`
    (the global RNG is left untouched): use them to move scores into a chosen range around a threshold.
    """
    config = surrogate_config_for(model_config, model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = KVzapSurrogate(config)
    with torch.no_grad():
        for layer in model.layers:
            last = layer if isinstance(layer, nn.Linear) else layer[-1]
            last.weight.mul_(scale)
            last.bias.mul_(scale).add_(score_offset)
    model.source = f"random-{model_type}-seed{seed}"
    return model.eval()
