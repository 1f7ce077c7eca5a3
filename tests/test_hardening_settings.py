"""Issue 12, settings and loading: one rule for which setting applies to which method at every entry point, strict
value coercion, nested compress() blocks, methods used on another model, non-finite surrogate weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvzap_eval import MethodConfig, build_method, compress
from kvzap_eval.errors import CheckpointError, ConfigError, KVzapError
from kvzap_eval.evaluation.model_args import method_config_from_args
from kvzap_eval.runtime.methods import METHOD_SETTINGS, applicable
from kvzap_eval.surrogate import load_surrogate, save_surrogate

from .conftest import left_padded, surrogate_for, tiny_model

# ------------------------------------------------------------------------------------------ which settings apply


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"method": "random", "compression_ratio": 0.5, "threshold": -4.0}, "method random does not take threshold"),
        ({"method": "kvzap", "compression_ratio": 0.5}, "method kvzap does not take compression_ratio"),
        ({"method": "full", "window": 128}, "method full does not take window .*it takes no settings"),
        (
            {"method": "streaming", "compression_ratio": 0.5, "seed": 3},
            "does not take seed .*it takes compression_ratio",
        ),
        ({"method": "snapkv", "compression_ratio": 0.5, "surrogate": "x/y"}, "does not take surrogate"),
        ({"method": "kvzip_plus", "compression_ratio": 0.5, "threshold": -3.0}, "AdaKV policy, or threshold"),
        ({"method": "kvzip_plus", "compression_ratio": 0.5, "window": 8}, "kvzip_plus does not take window"),
        ({"method": "kvzip_plus", "threshold": -3.0, "alpha": 0.5}, "kvzip_plus does not take alpha"),
        ({"method": "kvzap", "backend_threads": 2}, "backend_threads does not apply to scorer backend torch"),
        ({"method": "kvzap", "backend": "cuda_graph", "backend_dir": "x"}, "backend_dir does not apply"),
    ],
)
def test_setting_a_method_does_not_take_is_refused_naming_what_it_takes(settings, message):
    with pytest.raises(ConfigError, match=message) as info:
        MethodConfig(**settings)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "settings",
    [
        {"method": "random", "compression_ratio": 0.5, "threshold": -4.0},
        {"method": "kvzap", "compression_ratio": 0.5},
        {"method": "streaming", "compression_ratio": 0.5, "window": 8},
    ],
)
def test_kvzap_hf_and_the_python_api_refuse_alike(settings):
    with pytest.raises(ConfigError) as python_api:
        MethodConfig(**settings)
    with pytest.raises(ConfigError) as model_args:
        method_config_from_args(settings)
    assert str(model_args.value) == str(python_api.value)


def test_defaults_apply_only_to_the_methods_that_take_them():
    assert MethodConfig().active_settings() == {
        "method": "kvzap", "window": 128, "decoding": True, "model_type": "mlp", "backend": "torch"
    }  # fmt: skip
    assert MethodConfig(method="random", compression_ratio=0.5).active_settings() == {
        "method": "random", "compression_ratio": 0.5, "seed": 0
    }  # fmt: skip
    oracle = MethodConfig(method="kvzip_plus", threshold=-3)
    assert oracle.active_settings() == {"method": "kvzip_plus", "threshold": -3.0, "window": 128}
    again = MethodConfig(**MethodConfig(method="streaming", compression_ratio=0.25).active_settings())
    assert again == MethodConfig(method="streaming", compression_ratio=0.25, n_sink=4)


def test_every_method_accepts_exactly_its_table_entry():
    values = {"threshold": -3.0, "window": 8, "decoding": False, "compression_ratio": 0.5, "surrogate": "a/b",
              "model_type": "linear", "backend": "torch", "n_sink": 2, "alpha": 0.3, "seed": 5}  # fmt: skip
    for method, names in METHOD_SETTINGS.items():
        given = {name: values[name] for name in names if name not in ("backend_dir", "backend_threads")}
        if method == "kvzip_plus":
            given = {"compression_ratio": 0.5, "alpha": 0.3}
        assert MethodConfig(method=method, **given).active_settings() == {"method": method, **given}


def test_sweep_gives_each_method_only_the_shared_settings_it_takes(tiny):
    from kvzap_eval.evaluation.sweep import REFERENCE, Run, method_config

    shared = {"surrogate": tiny["surrogate"], "window": 8, "backend": "torch", "n_sink": 2, "seed": 3}
    done = {Run(REFERENCE, "t", 1024, threshold=-3.0).key: {"compression_ratio": 0.6}}
    configs = {
        name: method_config(Run(name, "t", 1024, threshold=tau, matched_threshold=matched), done, shared)
        for name, tau, matched in [
            ("full", None, None),
            ("kvzap_mlp", -3.0, None),
            ("kvzap_adakv", None, -3.0),
            ("random", None, -3.0),
            ("streaming", None, -3.0),
            ("kvzip_plus", None, -3.0),
            ("kvzip_plus_threshold", -3.0, None),
        ]
    }
    assert configs["full"].active_settings() == {"method": "full"}
    assert configs["kvzap_mlp"].active_settings() == {
        "method": "kvzap", "threshold": -3.0, "window": 8, "decoding": True, "surrogate": tiny["surrogate"],
        "model_type": "mlp", "backend": "torch",
    }  # fmt: skip
    assert configs["kvzap_adakv"].active_settings() == {
        "method": "kvzap_adakv", "compression_ratio": 0.6, "alpha": 0.2, "surrogate": tiny["surrogate"],
        "model_type": "mlp", "backend": "torch",
    }  # fmt: skip
    assert configs["random"].active_settings() == {"method": "random", "compression_ratio": 0.6, "seed": 3}
    assert configs["streaming"].active_settings() == {"method": "streaming", "compression_ratio": 0.6, "n_sink": 2}
    assert configs["kvzip_plus"].active_settings() == {"method": "kvzip_plus", "compression_ratio": 0.6, "alpha": 0.2}
    assert configs["kvzip_plus_threshold"].active_settings() == {"method": "kvzip_plus", "threshold": -3.0, "window": 8}


def test_applicable_keeps_the_method_and_its_settings_only():
    shared = {"window": 8, "surrogate": "a/b", "seed": 1}
    assert applicable("random", {"method": "random", **shared}) == {"method": "random", "seed": 1}
    assert applicable("kvzip_plus", {"threshold": -3.0, **shared}) == {"threshold": -3.0, "window": 8}


# ------------------------------------------------------------------------------------------------- coercion


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"window": 2.5}, r"window=2.5 is not a whole number"),
        ({"window": "2.5"}, r"window='2.5' is not a whole number"),
        ({"window": True}, "window=True is not a whole number"),
        ({"window": -1}, "non-negative"),
        ({"decoding": "maybe"}, "true or false"),
        ({"decoding": 2}, "true or false"),
        ({"threshold": float("nan")}, "finite"),
        ({"threshold": "inf"}, "finite"),
        ({"threshold": True}, "not true/false"),
        ({"method": "streaming", "compression_ratio": 0.5, "n_sink": -1}, "n_sink must be a non-negative integer"),
        ({"method": "kvzap_adakv", "compression_ratio": 0.5, "alpha": 1.5}, r"alpha must be in \[0.0, 1.0\]"),
        ({"method": "kvzap_adakv", "compression_ratio": 0.5, "alpha": float("nan")}, "finite"),
        ({"method": "random", "compression_ratio": 0.5, "seed": 1.5}, "seed=1.5 is not a whole number"),
        ({"method": "random", "compression_ratio": 0.5, "seed": -2}, "seed must be a non-negative integer"),
        ({"backend": "onnxruntime", "backend_threads": 0}, "backend_threads must be a positive integer"),
        ({"surrogate": ""}, "non-empty"),
        ({"method": "random", "compression_ratio": "half"}, "compression_ratio must be a number"),
    ],
)
def test_values_that_make_no_sense_are_refused_where_they_enter(settings, message):
    with pytest.raises(ConfigError, match=message) as info:
        MethodConfig(**settings)
    assert "\n" not in str(info.value)


def test_values_are_coerced_by_one_rule():
    assert MethodConfig(decoding="no").decoding is False
    assert MethodConfig(decoding="TRUE").decoding is True
    assert MethodConfig(decoding=0).decoding is False
    assert MethodConfig(window="3").window == 3 and MethodConfig(window=3.0).window == 3
    assert MethodConfig(threshold="-4.5").threshold == -4.5
    assert MethodConfig(method="random", compression_ratio="0.5", seed="7").seed == 7


@pytest.mark.parametrize(
    "args, message",
    [
        ({"window": 2.5}, "window=2.5 is not a whole number"),
        ({"prefill_chunk": 0}, "prefill_chunk must be a positive integer"),
        ({"prefill_chunk": 2.5}, "prefill_chunk=2.5 is not a whole number"),
        ({"protocol": "dense", "prefill_chunk": 64}, "prefill_chunk does not apply to protocol=dense"),
    ],
)
def test_model_args_are_checked_like_the_python_api(args, message):
    with pytest.raises(ConfigError, match=message):
        method_config_from_args(args)


def test_prefill_chunk_alone_means_chunked_and_keeps_an_explicit_paper_protocol():
    assert method_config_from_args({"prefill_chunk": 64})[1:] == ("chunked", 64)
    assert method_config_from_args({"protocol": "paper", "prefill_chunk": "64"})[1:] == ("paper", 64)
    config, protocol, chunk = method_config_from_args({"decoding": "no", "window": "16"})
    assert (config.decoding, config.window, protocol, chunk) == (False, 16, "paper", None)


# --------------------------------------------------------------------------------------- nested compress blocks


def test_nested_compress_on_one_model_is_one_line_and_the_outer_block_still_works(llama, tmp_path):
    path = str(save_surrogate(surrogate_for(llama), tmp_path / "s"))
    method = build_method(llama, surrogate=path, threshold=0.0, window=4)
    ids, mask = left_padded([40])
    before = llama.config._attn_implementation
    with compress(llama, method) as outer:
        with pytest.raises(KVzapError, match="already inside a compress\\(\\) block") as info:
            with compress(llama, build_method(llama, method="full")):
                pass
        assert "\n" not in str(info.value)
        llama(input_ids=ids, attention_mask=mask)
        assert 0.0 < outer.stats().achieved_compression_ratio < 1.0
    assert llama.config._attn_implementation == before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in llama.modules())
    with compress(llama, method) as again:  # the model is free again
        llama(input_ids=ids, attention_mask=mask)
        assert again.stats().achieved_compression_ratio == outer.stats().achieved_compression_ratio


def test_two_models_can_each_have_their_block():
    first, second = tiny_model(seed=0), tiny_model(seed=1)
    ids, mask = left_padded([20])
    with compress(first, build_method(first, method="random", compression_ratio=0.5)) as a:
        with compress(second, build_method(second, method="random", compression_ratio=0.5)) as b:
            first(input_ids=ids, attention_mask=mask)
            second(input_ids=ids, attention_mask=mask)
    assert a.stats().achieved_compression_ratio == b.stats().achieved_compression_ratio == pytest.approx(0.5, abs=0.05)


# --------------------------------------------------------------------------------------- method of another model


@pytest.mark.parametrize(
    "overrides, shown",
    [
        ({"hidden_size": 96}, "hidden_size 96"),
        ({"num_hidden_layers": 3}, "3 layers"),
        ({"num_key_value_heads": 4}, "4 KV heads"),
    ],
)
def test_method_built_for_another_model_is_refused(llama, tmp_path, overrides, shown):
    other = tiny_model(**overrides)
    for method in (
        build_method(llama, surrogate=str(save_surrogate(surrogate_for(llama), tmp_path / "s")), threshold=0.0),
        build_method(llama, method="random", compression_ratio=0.5),
    ):
        with pytest.raises(KVzapError, match=f"built for a model with 2 layers, 2 KV heads.*this model has .*{shown}"):
            with compress(other, method):
                pass
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in other.modules())


def test_kvzap_method_refuses_a_model_cast_after_it_was_built(llama, tmp_path):
    method = build_method(llama, surrogate=str(save_surrogate(surrogate_for(llama), tmp_path / "s")), threshold=0.0)
    llama.to(torch.float64)
    with pytest.raises(KVzapError, match="built for layer 0 on cpu/float32, but it is now on cpu/float64"):
        with compress(llama, method):
            pass


def test_oracle_method_refuses_another_model_of_the_same_shape(llama):
    method = build_method(llama, method="kvzip_plus", compression_ratio=0.5, tokenizer=object())
    with pytest.raises(KVzapError, match="KVzipPlusScorer scores with another model object"):
        with compress(tiny_model(seed=3), method):
            pass


def test_build_method_refuses_a_config_and_settings_together(llama):
    with pytest.raises(ConfigError, match="either a MethodConfig or settings"):
        build_method(llama, MethodConfig(method="full"), window=8)


# --------------------------------------------------------------------------------- non-finite surrogate weights


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_surrogate_weights_are_refused_naming_file_and_tensor(llama, tmp_path, bad):
    directory = save_surrogate(surrogate_for(llama), tmp_path / "s")
    weights = directory / "model.safetensors"
    tensors = load_file(weights)
    tensors["layers.1.2.bias"][0] = bad
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{weights}.*tensor 'layers.1.2.bias' holds 1 NaN or infinite"):
        load_surrogate(directory)
    with pytest.raises(CheckpointError, match="layers.1.2.bias"):
        build_method(llama, surrogate=str(directory))


def test_weights_that_overflow_the_load_dtype_are_refused(llama, tmp_path):
    surrogate = surrogate_for(llama)
    with torch.no_grad():
        surrogate.layers[0][0].weight[0, 0] = 1e6  # beyond float16's 65504
    directory = save_surrogate(surrogate, tmp_path / "s")
    assert load_surrogate(directory).layers[0][0].weight[0, 0] == 1e6
    with pytest.raises(CheckpointError, match="cast to torch.float16.*'layers.0.0.weight'.*load it in a wider dtype"):
        load_surrogate(directory, dtype=torch.float16)


def test_a_non_finite_surrogate_is_not_saved(llama, tmp_path):
    surrogate = surrogate_for(llama)
    with torch.no_grad():
        surrogate.layers[1][2].weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="surrogate to save.*'layers.1.2.weight'.*retrain it"):
        save_surrogate(surrogate, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_model_type_that_contradicts_the_given_surrogate_is_refused(llama, tmp_path):
    path = str(save_surrogate(surrogate_for(llama, "mlp"), tmp_path / "s"))
    assert build_method(llama, surrogate=path, threshold=0.0).config.model_type == "mlp"  # default: not checked
    assert build_method(llama, surrogate=path, model_type="mlp", threshold=0.0).scorer is not None
    with pytest.raises(ConfigError, match=f"surrogate '{path}' is of type mlp, but model_type=linear"):
        build_method(llama, surrogate=path, model_type="linear", threshold=0.0)
