"""ONNX export and the onnxruntime backend on the embedded SmolLM2-135M-Instruct (slow).

The surrogates are the shipped `KVzap-{mlp,linear}-SmolLM2-135M-Instruct` when installed, else random ones of the
same shape scaled so that the threshold splits the scores (the tests then say so in their output).
"""

from __future__ import annotations

import pytest
import torch

from exporters.onnx import main_export
from kvzap_eval import build_method, compress
from kvzap_eval.llm.loading import load_causal_lm
from kvzap_eval.surrogate import (
    random_surrogate,
    save_surrogate,
    shipped_surrogate,
)
from kvzap_eval.tools.demo import needle_prompt

from .onnx_helpers import needs_onnx

needs_onnx()
pytestmark = pytest.mark.slow
SMOLLM2 = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def smollm2():
    return load_causal_lm()


def surrogate_dir(model, model_type: str, tmp_path) -> tuple[str, float]:
    """(surrogate directory, a threshold that evicts a good share): shipped when installed, else random."""
    shipped = shipped_surrogate(SMOLLM2, model_type)
    if shipped is not None:
        return str(shipped), -3.75
    surrogate = random_surrogate(model.config, model_type, seed=0, scale=8.0)
    return str(save_surrogate(surrogate, tmp_path / f"KVzap-{model_type}-random")), 0.0


@pytest.mark.parametrize("model_type", ["mlp", "linear"])
def test_smollm2_surrogate_exports_and_validates_on_its_real_hidden_states(smollm2, tmp_path, model_type):
    model, _ = smollm2
    path, tau = surrogate_dir(model, model_type, tmp_path)
    result = main_export(path, tmp_path / "onnx", dtype="fp16", threshold=tau)  # auto: the embedded SmolLM2
    assert result.manifest.validation == "passed"
    assert any(line.startswith("real hidden states: embedded SmolLM2") for line in result.manifest.validation_inputs)
    real = [c for r in result.reports for c in r.checks if c.inputs.startswith("real")]
    assert len(real) == 30 and all(c.shape == [1, 512, 3] for c in real)
    worst = min(c.agreement_at_threshold for c in real)
    print(f"{path}: fp16 keep/evict agreement on real hidden states >= {100 * worst:.3f}%, max abs error "
          f"{max(c.max_abs_error for c in real):.2e}")  # fmt: skip
    assert worst >= 0.995


def held(session) -> list[set[tuple[int, int, int]]]:
    result = []
    for layer in session.cache.layers:
        index = torch.nonzero(layer.positions >= 0).tolist()
        result.append({(b, h, int(layer.positions[b, h, s])) for b, h, s in index})
    return result


@pytest.mark.filterwarnings("ignore:the fp16 export runs layers of another dtype")
def test_generation_with_onnxruntime_evicts_what_torch_evicts_on_a_1k_prompt(smollm2, tmp_path):
    model, tokenizer = smollm2
    path, tau = surrogate_dir(model, "mlp", tmp_path)
    text, _ = needle_prompt(tokenizer, 1000, seed=1)
    inputs = tokenizer(text, return_tensors="pt")
    exports = {dtype: main_export(path, tmp_path / dtype, dtype=dtype, hidden_states_model=None).directory
               for dtype in ("fp32", "fp16")}  # fmt: skip
    runs = {}
    for name, backend, directory in [("torch", "torch", None), ("fp32", "onnxruntime", exports["fp32"]),
                                     ("fp16", "onnxruntime", exports["fp16"])]:  # fmt: skip
        method = build_method(model, surrogate=path, threshold=tau, backend=backend, backend_dir=directory)
        with compress(model, method) as session:
            tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0)
        runs[name] = tokens, held(session), session.stats().achieved_compression_ratio
    tokens, kept, ratio = runs["torch"]
    assert inputs["input_ids"].shape[1] > 1000 and 0.3 < ratio < 0.95
    assert torch.equal(runs["fp32"][0], tokens) and runs["fp32"][1] == kept, "fp32: the very same evictions"
    total = sum(len(layer) for layer in kept)
    differ = sum(len(a ^ b) for a, b in zip(runs["fp16"][1], kept))
    print(f"{path}, tau={tau}: torch compression ratio {ratio:.3f}; fp32 onnxruntime identical; fp16 entries held "
          f"differently {differ} of {total} ({100 * (1 - differ / total):.3f}% agreement)")  # fmt: skip
    assert differ / total <= 0.005
