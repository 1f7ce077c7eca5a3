"""pytest-benchmark suite: one scorer call per backend, decode [1, 1, D] and prefill [1, 512, D], at D=576
(SmolLM2) and D=4096 (Qwen3-8B), single-threaded. `pytest tests/benchmarks --benchmark-enable` times them;
the default run (`--benchmark-disable`) calls each once as a smoke test. `kvzap-eval latency` is the full report."""

from __future__ import annotations

import pytest
import torch

from kvzap_eval.runtime.backends import make_backend
from kvzap_eval.surrogate import KVzapSurrogate, SurrogateConfig
from kvzap_eval.tools.latency import kvpress_style

pytest.importorskip("pytest_benchmark")

SHAPES = {
    "D576-mlp": SurrogateConfig(576, 3, 1, 72),
    "D576-linear": SurrogateConfig(576, 3, 1),
    "D4096-mlp": SurrogateConfig(4096, 8, 1, 512),
    "D4096-linear": SurrogateConfig(4096, 8, 1),
}
BACKENDS = ["kvpress-style", "torch", "onnxruntime"]


@pytest.fixture(scope="module", params=list(SHAPES))
def scorers(request, tmp_path_factory):
    """name -> scorer callable for one surrogate shape (onnxruntime only when installed)."""
    torch.manual_seed(0)
    surrogate = KVzapSurrogate(SHAPES[request.param]).eval()
    placement = [(torch.device("cpu"), torch.float32)]
    found = {"kvpress-style": kvpress_style(surrogate), "torch": make_backend("torch", surrogate, placement)}
    try:
        import onnxruntime  # noqa: F401

        from exporters.onnx import main_export

        directory = main_export(surrogate, tmp_path_factory.mktemp("onnx"), hidden_states_model=None).directory
        found["onnxruntime"] = make_backend("onnxruntime", surrogate, placement, directory, threads=1)
    except ImportError:
        pass
    return request.param, surrogate.config.input_dim, found


@pytest.mark.parametrize("tokens", [1, 512], ids=["decode", "prefill512"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_scorer_call(benchmark, scorers, backend, tokens):
    label, dim, found = scorers
    if backend not in found:
        pytest.skip(f"{backend} is not installed")
    benchmark.group = f"{label} T={tokens}"
    hidden = torch.randn(1, tokens, dim)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            scores = benchmark(found[backend], 0, hidden)
    finally:
        torch.set_num_threads(threads)
    assert scores.shape == (1, SHAPES[label].output_dim, tokens)
