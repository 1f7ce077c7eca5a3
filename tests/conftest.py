"""Shared fixtures: tiny random causal LMs (GQA; Qwen3 adds q/k-norm) and surrogates shaped for them."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from kvzap_eval.surrogate import random_surrogate

#: The forward keyword of the KV cache: `cache` in recent transformers, `past_key_values` in 5.2-5.18.
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def output_cache(output):
    """The cache a model forward returned, whichever name this transformers version gives it."""
    return getattr(output, CACHE_KWARG)


def tiny_config(arch: str = "llama", **overrides):
    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if arch == "qwen3":
        return Qwen3Config(head_dim=16, **common)
    return LlamaConfig(**common)


def tiny_model(arch: str = "llama", seed: int = 0, sharpen: float = 4.0, **overrides) -> torch.nn.Module:
    """A random model whose q/k projections are scaled up so attention is peaked and evictions change logits."""
    torch.manual_seed(seed)
    config = tiny_config(arch, **overrides)
    model = (Qwen3ForCausalLM if arch == "qwen3" else LlamaForCausalLM)(config).eval()
    model.generation_config.eos_token_id = None  # random models: generate exactly max_new_tokens
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(sharpen)
    return model


@pytest.fixture(params=["llama", "qwen3"])
def arch(request) -> str:
    return request.param


@pytest.fixture
def llama():
    return tiny_model("llama")


def surrogate_for(model, model_type: str = "mlp", seed: int = 1, scale: float = 4.0):
    return random_surrogate(model.config, model_type, seed=seed, scale=scale)


def left_padded(batch_lengths: list[int], vocab: int = 128, seed: int = 0):
    """Random input ids with left padding (pad id 0) and the matching attention mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(batch_lengths)
    ids = torch.zeros(len(batch_lengths), width, dtype=torch.long)
    mask = torch.zeros(len(batch_lengths), width, dtype=torch.long)
    for row, length in enumerate(batch_lengths):
        ids[row, width - length :] = torch.randint(1, vocab, (length,), generator=g)
        mask[row, width - length :] = 1
    return ids, mask


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny random Llama with the real SmolLM2 tokenizer and a surrogate for it, in hub layout (lm-eval tests)."""
    from .lmeval_helpers import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("lmeval"))


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """(tiny LLM, its MLP surrogate, the surrogate in hub layout, {dtype: ExportResult} for fp32 and fp16): the ONNX
    export every ONNX/ORT/TensorRT test shares, made once per session. Read-only: copy an export before changing it."""
    for module in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(module)
    from exporters.onnx import main_export

    from .onnx_helpers import checkpoint

    tmp = tmp_path_factory.mktemp("onnx-export")
    model, surrogate, path = checkpoint(tmp)
    results = {
        dtype: main_export(
            str(path), tmp / dtype, dtype=dtype, hidden_states_model=None, threshold=0.0, log=lambda _: None
        )
        for dtype in ("fp32", "fp16")
    }
    return model, surrogate, path, results
