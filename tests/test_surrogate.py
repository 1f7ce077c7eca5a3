"""KVzap surrogate model and checkpoint format (the `nvidia/KVzap-*` hub layout), loaded without the network."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig

from kvzap_eval import surrogate as sg
from kvzap_eval.errors import CheckpointError, ConfigError
from kvzap_eval.surrogate import (
    KVzapSurrogate,
    SurrogateConfig,
    check_against_model,
    default_surrogate_id,
    load_surrogate,
    random_surrogate,
    resolve_surrogate_source,
    save_surrogate,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LINEAR = SurrogateConfig(input_dim=16, output_dim=2, n_modules=3)
MLP = SurrogateConfig(input_dim=16, output_dim=2, n_modules=3, hidden_dim=4)


def tiny_llama(**overrides) -> LlamaConfig:
    kw = dict(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=3,
        vocab_size=100,
    )
    kw.update(overrides)
    cfg = LlamaConfig(**kw)
    cfg.name_or_path = "tiny/Llama-Tiny"
    return cfg


def make(config: SurrogateConfig, seed: int = 0) -> KVzapSurrogate:
    torch.manual_seed(seed)
    return KVzapSurrogate(config).eval()


def assert_same(a: KVzapSurrogate, b: KVzapSurrogate) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ----------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("config", [LINEAR, MLP], ids=["linear", "mlp"])
def test_round_trip(tmp_path: Path, config: SurrogateConfig):
    model = make(config)
    save_surrogate(model, tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["config.json", "model.safetensors"]  # no temps
    loaded = load_surrogate(tmp_path / "s")
    assert loaded.config == config
    assert not loaded.training
    assert_same(model, loaded)
    x = torch.randn(2, 5, 16)
    assert torch.equal(model(1, x), loaded(1, x))


def test_hub_layout_keys_and_config(tmp_path: Path):
    save_surrogate(make(LINEAR), tmp_path / "lin")
    save_surrogate(make(MLP), tmp_path / "mlp")
    with safe_open(str(tmp_path / "lin" / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == {f"layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")}
        assert f.get_slice("layers.0.weight").get_shape() == [2, 16]
    with safe_open(str(tmp_path / "mlp" / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == {f"layers.{i}.{j}.{p}" for i in range(3) for j in (0, 2) for p in ("weight", "bias")}
        assert f.get_slice("layers.2.0.weight").get_shape() == [4, 16]
        assert f.get_slice("layers.2.2.weight").get_shape() == [2, 4]
    cfg = json.loads((tmp_path / "lin" / "config.json").read_text())
    assert cfg["model_type"] == "kvzap" and cfg["architectures"] == ["KVzapModel"]
    assert (cfg["input_dim"], cfg["output_dim"], cfg["n_modules"], cfg["hidden_dim"]) == (16, 2, 3, None)
    assert cfg["dtype"] == "float32" and "transformers_version" in cfg
    assert json.loads((tmp_path / "mlp" / "config.json").read_text())["hidden_dim"] == 4


def test_save_dtype_and_load_dtype(tmp_path: Path):
    model = make(MLP)
    save_surrogate(model, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert next(load_surrogate(tmp_path, dtype=None).parameters()).dtype == torch.bfloat16
    as_fp32 = load_surrogate(tmp_path)  # default float32
    assert next(as_fp32.parameters()).dtype == torch.float32
    assert torch.equal(as_fp32.layers[0][0].weight, model.layers[0][0].weight.bfloat16().float())


def test_config_extra_keys_tolerated():
    d = {**MLP.to_json_dict(), "torch_dtype": "bfloat16", "something_new": [1, 2]}
    assert SurrogateConfig.from_json_dict(d) == MLP
    assert MLP.model_type == "mlp" and LINEAR.model_type == "linear"


# ------------------------------------------------------------------------------------------------- forward


def test_forward_matches_manual_mlp_with_exact_gelu():
    model = make(MLP)
    x = torch.randn(2, 7, 16)
    out = model(2, x)
    assert out.shape == (2, 2, 7)  # (B, H, T)
    lin0, lin2 = model.layers[2][0], model.layers[2][2]
    h = x @ lin0.weight.T + lin0.bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2.0)))
    ref = (h @ lin2.weight.T + lin2.bias).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_forward_linear():
    model = make(LINEAR)
    x = torch.randn(3, 4, 16)
    lin = model.layers[1]
    torch.testing.assert_close(model(1, x), (x @ lin.weight.T + lin.bias).transpose(1, 2))


# --------------------------------------------------------------------------------------------- hub cache


def write_fake_cache(cache: Path, repo_id: str, model: KVzapSurrogate) -> Path:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    save_surrogate(model, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.mark.parametrize("env", ["HF_HUB_CACHE", "HF_HOME"])
def test_hub_id_loads_offline_from_cache(tmp_path: Path, monkeypatch, env: str):
    model = make(MLP)
    home = tmp_path / "hf"
    write_fake_cache(home / "hub", "nvidia/KVzap-mlp-Foo", model)
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(env, str(home / "hub" if env == "HF_HUB_CACHE" else home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_surrogate("nvidia/KVzap-mlp-Foo")
    assert_same(model, loaded)
    assert loaded.source == "nvidia/KVzap-mlp-Foo"
    assert_same(model, load_surrogate("nvidia/KVzap-mlp-Foo", revision=COMMIT))


def test_missing_hub_id_offline_is_one_line(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as info:
        load_surrogate("nvidia/KVzap-mlp-Foo")
    msg = str(info.value)
    assert "\n" not in msg
    assert "'nvidia/KVzap-mlp-Foo'" in msg and "HF_HUB_OFFLINE=1" in msg
    assert "download nvidia/KVzap-mlp-Foo" in msg and "local directory" in msg


def test_unreachable_hub_is_one_line(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def fail(*args, **kwargs):
        raise LocalEntryNotFoundError("An error happened while trying to locate the files\non the Hub")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    expected = "^surrogate 'nvidia/KVzap-linear-Bar' is not in the local .* cannot be reached"
    with pytest.raises(CheckpointError, match=expected) as info:
        load_surrogate("nvidia/KVzap-linear-Bar")
    assert "\n" not in str(info.value)


def test_missing_local_directory(tmp_path: Path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_surrogate(tmp_path / "nope" / "deeper")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        load_surrogate(tmp_path / "file")


# ------------------------------------------------------------------------------------------- bad checkpoints


class Boom:
    """Unpickling this creates the marker file: proof that a pickle was (or was not) loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_only_checkpoint_is_refused_without_unpickling(tmp_path: Path, monkeypatch):
    # The payload works: unpickling it does create its marker.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Boom(probe))).close()
    assert probe.exists()

    marker = tmp_path / "unpickled"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(LINEAR.to_json_dict()))
    torch.save({"layers.0.weight": Boom(marker)}, ckpt / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(CheckpointError, match=r"pickle checkpoints \(pytorch_model.bin\).*model.safetensors"):
        load_surrogate(ckpt)
    assert not marker.exists()
    (ckpt / "config.json").unlink()  # refused for the pickle, not for the missing config
    with pytest.raises(CheckpointError, match="pickle checkpoints"):
        load_surrogate(ckpt)
    assert not marker.exists()


def test_missing_config_keys_named_with_file(tmp_path: Path):
    save_surrogate(make(LINEAR), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["output_dim"], cfg["n_modules"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as info:
        load_surrogate(tmp_path)
    msg = str(info.value)
    assert "output_dim, n_modules" in msg and str(tmp_path / "config.json") in msg


def test_bad_config_values(tmp_path: Path):
    with pytest.raises(CheckpointError, match="input_dim=0"):
        SurrogateConfig.from_json_dict({"input_dim": 0, "output_dim": 2, "n_modules": 1})
    with pytest.raises(CheckpointError, match="not a KVzap surrogate"):
        SurrogateConfig.from_json_dict({"model_type": "llama", "input_dim": 4, "output_dim": 2, "n_modules": 1})
    with pytest.raises(ConfigError):
        SurrogateConfig(input_dim=4, output_dim=2, n_modules=1, hidden_dim=-1)
    save_surrogate(make(LINEAR), tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        load_surrogate(tmp_path)


def test_wrong_tensor_shapes(tmp_path: Path):
    save_surrogate(make(MLP), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["input_dim"] = 32
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"'layers.0.0.weight' has shape \[4, 16\], its config expects \[4, 32\]"):
        load_surrogate(tmp_path)


def test_missing_and_unexpected_keys(tmp_path: Path):
    save_surrogate(make(LINEAR), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(MLP.to_json_dict()))  # config says mlp, weights are linear
    with pytest.raises(CheckpointError, match=r"missing layers\.0\.0\.bias.*; unexpected layers\.0\.bias"):
        load_surrogate(tmp_path)
    # one tensor too many
    tensors = {k: v.contiguous() for k, v in make(LINEAR).state_dict().items()}
    tensors["layers.3.weight"] = torch.zeros(2, 16)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(LINEAR.to_json_dict()))
    with pytest.raises(CheckpointError, match=r"unexpected layers\.3\.weight"):
        load_surrogate(tmp_path)


def test_corrupt_safetensors(tmp_path: Path):
    save_surrogate(make(LINEAR), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_surrogate(tmp_path)


# --------------------------------------------------------------------------------------- naming / matching


def test_naming_rule():
    assert default_surrogate_id("meta-llama/Llama-3.1-8B-Instruct") == "nvidia/KVzap-mlp-Llama-3.1-8B-Instruct"
    assert default_surrogate_id("/x/y/Qwen3-8B/", "linear") == "nvidia/KVzap-linear-Qwen3-8B"
    with pytest.raises(ConfigError, match="'conv'"):
        default_surrogate_id("Qwen/Qwen3-8B", "conv")


def test_resolve_surrogate_source(tmp_path: Path, monkeypatch):
    cfg = tiny_llama()
    assert resolve_surrogate_source(cfg, None, "linear") == "nvidia/KVzap-linear-Llama-Tiny"
    assert resolve_surrogate_source(cfg, "me/my-surrogate", "linear") == "me/my-surrogate"
    monkeypatch.setitem(sg.SHIPPED, "KVzap-mlp-Llama-Tiny", tmp_path)
    assert resolve_surrogate_source(cfg, None, "mlp") == tmp_path
    assert resolve_surrogate_source(cfg, None, "linear") == "nvidia/KVzap-linear-Llama-Tiny"
    with pytest.raises(ConfigError):
        resolve_surrogate_source(cfg, None, "conv")


def test_check_against_model_names_both_sides():
    cfg = tiny_llama()
    check_against_model(SurrogateConfig(64, 2, 3, 8), cfg)  # fits
    bad = SurrogateConfig(input_dim=4096, output_dim=8, n_modules=3)
    with pytest.raises(CheckpointError) as info:
        check_against_model(bad, cfg, surrogate_name="nvidia/KVzap-linear-Qwen3-8B")
    msg = str(info.value)
    assert "\n" not in msg
    assert "surrogate input_dim=4096 does not match the model's hidden_size=64" in msg
    assert "surrogate output_dim=8 does not match the model's num_key_value_heads=2" in msg
    assert "n_modules" not in msg
    assert "'nvidia/KVzap-linear-Qwen3-8B'" in msg and "'tiny/Llama-Tiny'" in msg


def test_check_falls_back_to_attention_heads():
    cfg = tiny_llama()
    cfg.num_key_value_heads = None
    with pytest.raises(CheckpointError, match="num_attention_heads=4"):
        check_against_model(SurrogateConfig(64, 2, 3), cfg)


# -------------------------------------------------------------------------------------------------- random


def test_random_surrogate_fits_model_and_is_seeded():
    cfg = tiny_llama()
    state = torch.random.get_rng_state()
    model = random_surrogate(cfg, "mlp", seed=3)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    assert model.config == SurrogateConfig(input_dim=64, output_dim=2, n_modules=3, hidden_dim=8)
    check_against_model(model, cfg)
    assert_same(model, random_surrogate(cfg, "mlp", seed=3))
    assert random_surrogate(cfg, "linear").config.hidden_dim is None

    x = torch.randn(1, 5, 64)
    shifted = random_surrogate(cfg, "mlp", seed=3, scale=2.0, score_offset=-5.0)
    torch.testing.assert_close(shifted(0, x), 2.0 * model(0, x) - 5.0)
