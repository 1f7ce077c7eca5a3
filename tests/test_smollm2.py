"""The runtime on the embedded SmolLM2-135M-Instruct (slow: a real 30-layer model on CPU)."""

from __future__ import annotations

import pytest
import torch

from kvzap_eval import build_method, compress
from kvzap_eval.llm.loading import load_causal_lm
from kvzap_eval.runtime.cache import SLACK
from kvzap_eval.surrogate import random_surrogate, save_surrogate
from kvzap_eval.tools.demo import needle_prompt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_causal_lm()


@pytest.fixture(scope="module")
def needle(smollm2):
    model, tokenizer = smollm2
    text, number = needle_prompt(tokenizer, 500, seed=3)
    return tokenizer(text, return_tensors="pt"), number


def greedy(model, inputs, steps=10):
    return model.generate(**inputs, max_new_tokens=steps, do_sample=False, pad_token_id=0)


def test_generation_with_a_written_surrogate_prunes_and_frees_memory(smollm2, needle, tmp_path):
    model, tokenizer = smollm2
    inputs, number = needle
    path = save_surrogate(random_surrogate(model.config, "mlp", seed=0, scale=8.0), tmp_path / "KVzap-mlp-test")
    full = greedy(model, inputs)
    with compress(model, build_method(model, surrogate=str(path), threshold=-1e9)) as session:
        untouched = greedy(model, inputs)
        assert session.stats().achieved_compression_ratio == 0.0
    assert torch.equal(untouched, full), "a threshold nothing falls below changes nothing"
    assert number in tokenizer.decode(full[0])

    with compress(model, build_method(model, surrogate=str(path), threshold=0.0)) as session:
        greedy(model, inputs)
        stats = session.stats()
    assert 0.05 < stats.achieved_compression_ratio < 0.95
    for layer in session.cache.layers:  # bytes follow each (batch, head) row's kept count, plus SLACK slots per row
        assert int(layer.kept().sum()) <= layer.keys.shape[0] <= int(layer.kept().sum()) + SLACK * layer.rows
    assert stats.held_kv_bytes_fraction < 1.0
    assert stats.layers[0].logical_length == inputs["input_ids"].shape[1] + 9


def test_streaming_at_fixed_ratio_on_smollm2(smollm2, needle):
    model, _ = smollm2
    inputs, _ = needle
    with compress(model, build_method(model, method="streaming", compression_ratio=0.5)) as session:
        greedy(model, inputs, steps=2)
    assert session.stats().achieved_compression_ratio == pytest.approx(0.5, abs=0.01)
