"""Model-parallel placement: every surrogate layer, backend session and cache layer follows its own decoder layer.

A CPU machine has one device, so the split these tests make is one of dtypes (a device_map-loaded model whose second
decoder layer runs in bfloat16, its inputs cast by hooks the way accelerate's hooks move them between GPUs), and, for
construction only, one of devices (the second layer on the `meta` device). `scripts/gpu_check.sh` runs the real
two-GPU split where two GPUs exist.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from kvzap_eval.errors import ConfigError
from kvzap_eval.llm.model_info import placement
from kvzap_eval.runtime.methods import build_method
from kvzap_eval.runtime.session import compress
from kvzap_eval.surrogate import save_surrogate

from .conftest import left_padded, surrogate_for, tiny_model


@pytest.fixture
def split_model(tmp_path):
    """A tiny Llama loaded through a per-module device_map, its layer 1 in bfloat16 behind casting hooks."""
    tiny_model("llama").save_pretrained(tmp_path / "model")
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    model = LlamaForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    layer = model.model.layers[1].to(torch.bfloat16)

    def to_layer_dtype(module, args, kwargs):
        args = tuple(a.to(torch.bfloat16) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = kwargs["hidden_states"].to(torch.bfloat16)
        kwargs["position_embeddings"] = tuple(t.to(torch.bfloat16) for t in kwargs["position_embeddings"])
        return args, kwargs

    def back_to_float(module, args, kwargs, output):
        return output.float() if isinstance(output, torch.Tensor) else (output[0].float(), *output[1:])

    layer.register_forward_pre_hook(to_layer_dtype, with_kwargs=True)
    layer.register_forward_hook(back_to_float, with_kwargs=True)
    surrogate_dir = save_surrogate(surrogate_for(model), tmp_path / "surrogate")
    return model, str(surrogate_dir)


def test_placement_is_read_from_each_decoder_layer(split_model):
    model, _ = split_model
    assert [dtype for _, dtype in placement(model)] == [torch.float32, torch.bfloat16]


def test_scorer_and_cache_layers_take_their_decoder_layers_dtype(split_model):
    model, surrogate_dir = split_model
    method = build_method(model, surrogate=surrogate_dir, threshold=0.0, window=8)
    weights = method.scorer.backend.weights
    assert {w.dtype for w in weights[0]} == {torch.float32} and {w.dtype for w in weights[1]} == {torch.bfloat16}
    ids, mask = left_padded([60, 45])
    with compress(model, method) as session:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 64)
    layers = session.cache.layers
    assert layers[0].keys.dtype == layers[0].values.dtype == torch.float32
    assert layers[1].keys.dtype == layers[1].values.dtype == torch.bfloat16
    assert all(layer.keys.device == device for layer, (device, _) in zip(layers, placement(model)))
    assert 0.0 < session.stats().achieved_compression_ratio < 1.0, (
        "both layers evicted: the bf16 layer's scores were used"
    )


def test_backends_bind_each_layer_to_its_device(tmp_path, monkeypatch):
    monkeypatch.setenv("KVZAP_EVAL_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama")
    model.model.layers[1].to("meta")  # a second device, for construction only
    assert [device.type for device, _ in placement(model)] == ["cpu", "meta"]
    surrogate_dir = save_surrogate(surrogate_for(model), tmp_path / "surrogate")
    method = build_method(model, surrogate=surrogate_dir, threshold=0.0)
    assert [w[0].device.type for w in method.scorer.backend.weights] == ["cpu", "meta"]
    pytest.importorskip("onnxruntime")
    with pytest.raises(ConfigError, match="onnxruntime runs surrogate layers on cpu or cuda, not on meta"):
        build_method(model, surrogate=surrogate_dir, threshold=0.0, backend="onnxruntime")


def test_onnxruntime_sessions_follow_their_layers(split_model, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("KVZAP_EVAL_CACHE", str(tmp_path / "cache"))
    model, surrogate_dir = split_model
    model.model.layers[1].float()  # onnxruntime runs fp32 on CPU
    method = build_method(model, surrogate=surrogate_dir, threshold=0.0, backend="onnxruntime")
    assert [session.device for session in method.scorer.backend.layers] == [d for d, _ in placement(model)]


def test_kvzap_hf_with_parallelize_places_the_scorer_per_layer(tiny):
    pytest.importorskip("lm_eval")
    from kvzap_eval.evaluation.lm_eval_model import KVzapHFLM

    lm = KVzapHFLM(pretrained=tiny["model"], surrogate=tiny["surrogate"], parallelize=True, dtype="float32")
    weights = lm.method.scorer.backend.weights
    assert [(w[0].device, w[0].dtype) for w in weights] == placement(lm.model)
