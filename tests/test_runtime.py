"""The runtime end to end on tiny models: memory really freed, statistics, methods, hooks, bad input."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from kvzap_eval import MethodConfig, build_method, compress
from kvzap_eval.errors import (
    CheckpointError,
    ConfigError,
    KVzapError,
    MissingExtraError,
    UnsupportedModelError,
    require,
)
from kvzap_eval.runtime.cache import SLACK
from kvzap_eval.surrogate import save_surrogate

from .conftest import left_padded, surrogate_for, tiny_model


@pytest.fixture
def surrogate_dir(tmp_path, llama):
    return str(save_surrogate(surrogate_for(llama), tmp_path / "KVzap-mlp-tiny"))


def run_generate(model, ids, mask, steps=8):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0)


def test_prefill_compaction_frees_memory_and_bytes_follow_kept_count(llama, surrogate_dir):
    method = build_method(llama, method="kvzap", surrogate=surrogate_dir, threshold=0.0, window=8)
    ids, mask = left_padded([120])
    with compress(llama, method) as session:
        llama(input_ids=ids, attention_mask=mask)
        stats = session.stats()
    assert 0.2 < stats.achieved_compression_ratio < 0.9
    for layer, layer_stats in zip(session.cache.layers, stats.layers):
        kept = layer.kept().flatten()
        assert layer.capacity.tolist() == (kept + SLACK).tolist(), "each row holds its kept entries + SLACK slots"
        assert layer.keys.shape[0] == int(kept.sum()) + SLACK * kept.numel()
        assert layer_stats.kept.sum() + layer_stats.evicted.sum() == 120 * 2
        assert layer_stats.held_kv_bytes == layer.nbytes()
        assert layer_stats.kept_kv_bytes == int(kept.sum()) * 2 * 16 * 4  # keys + values, head_dim 16, fp32


def test_full_method_equals_stock_dense_cache(llama):
    ids, mask = left_padded([30, 20])
    expected = llama(input_ids=ids, attention_mask=mask, cache=DynamicCache(config=llama.config)).logits
    with compress(llama, build_method(llama, method="full")):
        logits = llama(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["random", "streaming", "kvzap_adakv"])
def test_fixed_ratio_methods_reach_their_ratio(llama, surrogate_dir, method):
    surrogate = {"surrogate": surrogate_dir} if method == "kvzap_adakv" else {}
    config = MethodConfig(method=method, compression_ratio=0.75, **surrogate)
    ids, mask = left_padded([64, 40])
    with compress(llama, build_method(llama, config)) as session:
        run_generate(llama, ids, mask, steps=4)
        per_layer = [layer_stats.evicted.sum(-1) for layer_stats in session.stats().layers]
    for evicted in per_layer:  # prefill only: n_kept = int(T * 0.25) per head on average, per batch row
        assert evicted.tolist() == [2 * (64 - 16), 2 * (40 - 10)]


def test_hooks_and_attention_are_restored_after_the_block(llama, surrogate_dir):
    before = llama.config._attn_implementation
    with compress(llama, build_method(llama, surrogate=surrogate_dir, threshold=0.0)):
        assert llama.config._attn_implementation.startswith("kvzap")
    assert llama.config._attn_implementation == before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in llama.modules())


def test_pause_runs_without_pruning(llama, surrogate_dir):
    ids, mask = left_padded([60])
    with compress(llama, build_method(llama, surrogate=surrogate_dir, threshold=0.0, window=4)) as session:
        with session.pause():
            llama(input_ids=ids, attention_mask=mask)
        assert session.stats().achieved_compression_ratio == 0.0


def test_decode_reuses_freed_slots(llama, surrogate_dir):
    ids, mask = left_padded([40])
    method = build_method(llama, surrogate=surrogate_dir, threshold=0.0, window=4)
    with compress(llama, method) as session:
        run_generate(llama, ids, mask, steps=40)
        layer = session.cache.layers[0]
        assert layer.cumulative_length == 79
        # freed slots are reused: the arena never holds more than the kept entries + SLACK free slots per row
        assert layer.keys.shape[0] <= int(layer.kept().sum()) + SLACK * layer.rows


def test_scorer_latency_is_recorded_per_layer_and_phase(llama, surrogate_dir):
    ids, mask = left_padded([40])
    with compress(llama, build_method(llama, surrogate=surrogate_dir, threshold=0.0)) as session:
        run_generate(llama, ids, mask, steps=3)
    assert session.timer.calls["prefill"] == [1, 1]
    assert session.timer.calls["decode"] == [2, 2]
    assert all(us > 0 for us in session.timer.mean_us()["decode"])


def test_filled_stock_cache_is_refused(llama, surrogate_dir):
    ids, mask = left_padded([10])
    cache = DynamicCache(config=llama.config)
    llama(input_ids=ids, cache=cache)
    with compress(llama, build_method(llama, surrogate=surrogate_dir, threshold=0.0)):
        with pytest.raises(KVzapError, match="session.new_cache"):
            llama(input_ids=ids[:, :1], cache=cache)


def test_unsupported_architecture_names_the_supported_ones():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="llama, mistral, qwen2, qwen3"):
        with compress(model, build_method(model, method="full")):
            pass


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"method": "snapkv2"}, "unknown method 'snapkv2'"),
        ({"backend": "cuda-magic"}, "unknown scorer backend"),
        ({"method": "random"}, "needs compression_ratio"),
        ({"method": "random", "compression_ratio": 1.0}, r"\[0, 1\)"),
        ({"threshold": float("nan")}, "finite"),
        ({"window": -3}, "non-negative"),
        ({"model_type": "transformer"}, "'linear' or 'mlp'"),
    ],
)
def test_bad_settings_fail_with_one_line(settings, message):
    with pytest.raises(ConfigError, match=message) as info:
        MethodConfig(**settings)
    assert "\n" not in str(info.value)


def test_surrogate_for_another_model_names_both_sides(llama, tmp_path):
    other = tiny_model("llama", hidden_size=96)
    path = save_surrogate(surrogate_for(other), tmp_path / "KVzap-mlp-other")
    with pytest.raises(CheckpointError, match=r"input_dim=96.*hidden_size=64"):
        build_method(llama, surrogate=str(path))


def test_missing_extra_names_the_extra():
    with pytest.raises(MissingExtraError, match=r"pip install 'kvzap-eval\[trt\]'"):
        require("tensorrt", "trt")


@pytest.mark.parametrize(
    "settings, prefill_only",
    [
        ({"method": "kvzap"}, False),
        ({"method": "kvzap", "decoding": False}, False),  # still prunes a question after the context
        ({"method": "full"}, False),
        ({"method": "random", "compression_ratio": 0.5}, True),
        ({"method": "kvzap_adakv", "compression_ratio": 0.5}, True),
        ({"method": "kvzip_plus", "threshold": -4.0}, True),
    ],
)
def test_a_method_says_whether_it_prunes_the_prefill_only(settings, prefill_only):
    from kvzap_eval.runtime.methods import Method

    assert Method(MethodConfig(**settings), scorer=None, policy=None).prefill_only is prefill_only
