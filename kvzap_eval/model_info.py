"""What the runtime needs to know about an LLM: supported architecture, decoder attention modules, placement."""

from __future__ import annotations

import torch

from .errors import UnsupportedModelError

#: Decoder-only architectures whose attention modules the runtime has been checked against.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def check_supported(model: torch.nn.Module) -> None:
    """Raise `UnsupportedModelError` unless the model is a supported, full-attention causal LM."""
    config = model.config
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
