"""What the runtime needs to know about an LLM: supported architecture, decoder attention modules, placement."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UnsupportedModelError

#: Decoder-only architectures whose attention modules the runtime has been checked against.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def check_supported(model: torch.nn.Module) -> None:
    """Raise `UnsupportedModelError` unless the model is a supported, full-attention causal LM."""
    check_supported_config(model.config)


def check_supported_config(config) -> None:
    """`check_supported` on a model's config alone (before its weights are loaded)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"architecture {model_type!r} is not supported by the KVzap runtime: use one of "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise UnsupportedModelError(
            f"model {config.name_or_path!r} has {sorted(layer_types)} layers: only full-attention models are supported"
        )


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The `self_attn` module of every decoder layer, in layer order."""
    modules = [m for name, m in model.named_modules() if name.endswith("self_attn") and hasattr(m, "layer_idx")]
    modules.sort(key=lambda m: m.layer_idx)
    if [m.layer_idx for m in modules] != list(range(model.config.num_hidden_layers)):
        raise UnsupportedModelError(
            f"could not find one self_attn per decoder layer in {type(model).__name__}: supported architectures are "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return modules


def placement(model: torch.nn.Module) -> list[tuple[torch.device, torch.dtype]]:
    """(device, dtype) of each decoder layer, read from that layer's own attention weights."""
    result = []
    for module in attention_modules(model):
        weight = next(p for p in module.parameters() if p.is_floating_point())
        result.append((weight.device, weight.dtype))
    return result


def num_kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass(frozen=True)
class ModelShape:
    """What a built method depends on: the LLM's dimensions, and (for scorers bound to the layers' devices and
    dtypes, i.e. KVzap's backends) each layer's placement."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    placement: tuple[str, ...] | None = None  # "device/dtype" per layer, when the method depends on it

    @classmethod
    def of(cls, model: torch.nn.Module, with_placement: bool = False) -> ModelShape:
        config = model.config
        where = tuple(f"{device}/{str(dtype).removeprefix('torch.')}" for device, dtype in placement(model))
        return cls(config.num_hidden_layers, num_kv_heads(config), head_dim(config), config.hidden_size,
                   where if with_placement else None)  # fmt: skip

    def describe(self) -> str:
        return (f"{self.num_layers} layers, {self.num_kv_heads} KV heads, head_dim {self.head_dim}, "
                f"hidden_size {self.hidden_size}")  # fmt: skip

    def mismatch(self, model: torch.nn.Module) -> str | None:
        """Why a method built for this shape cannot run on `model` (one line), or None when it can."""
        other = ModelShape.of(model, with_placement=self.placement is not None)
        if other.describe() != self.describe():
            return (f"this method was built for a model with {self.describe()}, but this model has "
                    f"{other.describe()}: call build_method(model, ...) with the model you compress")  # fmt: skip
        if other.placement != self.placement:
            layer = next(i for i, (a, b) in enumerate(zip(self.placement, other.placement)) if a != b)
            return (f"this method's scorer was built for layer {layer} on {self.placement[layer]}, but it is now on "
                    f"{other.placement[layer]}: call build_method again after moving or casting the model")  # fmt: skip
        return None
