"""GPU paths end to end: CUDA-graph replay, onnxruntime's CUDA execution provider, TensorRT engines.

Each test skips with its reason where there is no CUDA device, no onnxruntime-gpu or no TensorRT; run them on a
GPU machine with `tox -e gpu` or `bash scripts/gpu_check.sh` (which also prints the GPU latency table).
"""

from __future__ import annotations

import pytest
import torch

from kvzap_eval import build_method, compress
from kvzap_eval.llm.model_info import placement
from kvzap_eval.runtime.backends import make_backend

from ..conftest import left_padded, surrogate_for, tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch"),
]


def cuda_model(dtype=torch.float32):
    return tiny_model().to("cuda", dtype)


def held(session) -> list[set[tuple[int, int, int]]]:
    out = []
    for layer in session.cache.layers:
        index = torch.nonzero(layer.positions >= 0).tolist()
        out.append({(b, h, int(layer.positions[b, h, s])) for b, h, s in index})
    return out


def generate_with(model, backend: str, **settings):
    ids, mask = left_padded([60, 41])
    method = build_method(model, surrogate=settings.pop("surrogate"), threshold=0.0, window=8, backend=backend,
                          **settings)  # fmt: skip
    with compress(model, method) as session:
        tokens = model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=12, do_sample=False)
    return tokens, held(session)


def test_cuda_graph_replay_equals_the_torch_backend():
    model = cuda_model()
    surrogate = surrogate_for(model)
    graphs = make_backend("cuda_graph", surrogate, placement(model))
    plain = make_backend("torch", surrogate, placement(model))
    for batch in (1, 3):
        for _ in range(3):  # capture, then replays with new inputs
            x = torch.randn(batch, 1, 64, device="cuda")
            torch.testing.assert_close(graphs(1, x), plain(1, x))
    x = torch.randn(2, 50, 64, device="cuda")
    torch.testing.assert_close(graphs(0, x), plain(0, x))
    assert set(graphs.graphs) == {(1, 1, torch.float32), (1, 3, torch.float32)}


def test_cuda_graph_generation_evicts_what_torch_evicts(tmp_path):
    from kvzap_eval.surrogate import save_surrogate

    model = cuda_model()
    path = str(save_surrogate(surrogate_for(model), tmp_path / "s"))
    tokens, kept = generate_with(model, "torch", surrogate=path)
    graph_tokens, graph_kept = generate_with(model, "cuda_graph", surrogate=path)
    assert torch.equal(tokens, graph_tokens) and kept == graph_kept


def test_onnxruntime_cuda_execution_provider_equals_torch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA execution provider (install onnxruntime-gpu, extra onnx-gpu)")
    from exporters.onnx import main_export

    model = cuda_model()
    surrogate = surrogate_for(model)
    directory = main_export(surrogate, tmp_path / "onnx", hidden_states_model=None).directory
    ours = make_backend("onnxruntime", surrogate, placement(model), directory)
    plain = make_backend("torch", surrogate.to("cuda"), placement(model))
    for shape in [(1, 1, 64), (2, 40, 64)]:
        x = torch.randn(shape, device="cuda")
        torch.testing.assert_close(ours(0, x), plain(0, x), atol=1e-4, rtol=1e-4)


@pytest.fixture
def tensorrt():
    return pytest.importorskip("tensorrt", reason="TensorRT is not installed (extra trt)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensorrt_engines_equal_torch_and_are_cached(tensorrt, tmp_path, dtype):
    from exporters.onnx import main_export
    from exporters.trt import BuildConfig, EngineProfiles, ensure_engines

    model = cuda_model(dtype)
    surrogate = surrogate_for(model)
    export = main_export(surrogate, tmp_path / "onnx", dtype={torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype],
                         hidden_states_model=None).directory  # fmt: skip
    ours = make_backend("tensorrt", surrogate, placement(model), export)
    plain = make_backend("torch", surrogate.to("cuda"), placement(model))
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for shape in [(1, 1, 64), (1, 300, 64)]:
        x = torch.randn(shape, device="cuda", dtype=dtype)
        torch.testing.assert_close(ours(1, x), plain(1, x), atol=tol, rtol=tol)
    assert len({t.data_ptr() for t in ours.scratch.values()}) == 1, "one scratch buffer for all layers"
    messages = []
    again = ensure_engines(export, None, BuildConfig(EngineProfiles()), log=messages.append)
    assert again.paths == sorted((export / "tensorrt").glob("layer_*.engine")) and not messages


def test_tensorrt_engine_that_cannot_be_deserialized_is_rebuilt(tensorrt, tmp_path, capfd):
    import hashlib
    import json

    from exporters.onnx import main_export

    model = cuda_model()
    surrogate = surrogate_for(model)
    export = main_export(surrogate, tmp_path / "onnx", hidden_states_model=None).directory
    make_backend("tensorrt", surrogate, placement(model), export)
    (engine,) = (export / "tensorrt").glob("layer_00-*.engine")
    engine.write_bytes(b"not an engine from this TensorRT")
    make_backend("tensorrt", surrogate, placement(model), export)
    assert "the cached engine is not used: the engine file does not hash" in capfd.readouterr().err
    engine.write_bytes(b"not an engine from this TensorRT")  # now with a sidecar that vouches for these bytes
    record = json.loads(engine.with_suffix(".json").read_text())
    record["engine_sha256"] = hashlib.sha256(engine.read_bytes()).hexdigest()
    engine.with_suffix(".json").write_text(json.dumps(record))
    ours = make_backend("tensorrt", surrogate, placement(model), export)
    assert "could not deserialize" in capfd.readouterr().err
    x = torch.randn(1, 1, 64, device="cuda")
    torch.testing.assert_close(ours(0, x), surrogate.to("cuda")(0, x).detach(), atol=1e-4, rtol=1e-4)


def split_model(tmp_path):
    """The tiny model loaded with its two decoder layers on cuda:0 and cuda:1 (accelerate moves the activations)."""
    from transformers import LlamaForCausalLM

    tiny_model().save_pretrained(tmp_path / "model")
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.norm": 1,
                  "model.rotary_emb": 0, "lm_head": 1}  # fmt: skip
    model = LlamaForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map).eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="the two-device split needs two GPUs")
@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "tensorrt"])
def test_two_gpu_split_keeps_every_layer_on_its_device_and_equals_one_gpu(tmp_path, backend):
    from kvzap_eval.surrogate import save_surrogate

    if backend == "onnxruntime":
        ort = pytest.importorskip("onnxruntime")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            pytest.skip("onnxruntime has no CUDA execution provider (install onnxruntime-gpu, extra onnx-gpu)")
    if backend == "tensorrt":
        pytest.importorskip("tensorrt", reason="TensorRT is not installed (extra trt)")
    model = split_model(tmp_path)
    assert [str(device) for device, _ in placement(model)] == ["cuda:0", "cuda:1"]
    path = str(save_surrogate(surrogate_for(model), tmp_path / "s"))
    method = build_method(model, surrogate=path, threshold=0.0, window=8, backend=backend)
    ids, mask = left_padded([60, 41])
    with compress(model, method) as session:
        tokens = model.generate(input_ids=ids.cuda(0), attention_mask=mask.cuda(0), max_new_tokens=12, do_sample=False)
    assert [layer.keys.device.index for layer in session.cache.layers] == [0, 1]
    backend_layers = getattr(method.scorer.backend, "layers", None) or method.scorer.backend.weights
    devices = [getattr(layer, "device", None) or layer[0].device for layer in backend_layers]
    assert [d.index for d in devices] == [0, 1]
    single = cuda_model()
    single.load_state_dict({k: v.to("cuda:0") for k, v in model.state_dict().items()})
    one_tokens, one_kept = generate_with(single, backend, surrogate=path)
    assert torch.equal(tokens.cpu(), one_tokens.cpu()) and held(session) == one_kept
    print(f"two-device split ({backend}): layers on cuda:0 and cuda:1, tokens and evictions equal to one GPU")


def test_onnx_export_of_a_surrogate_on_the_gpu_equals_its_cpu_export(tmp_path):
    """Found on an H200: tracing a surrogate whose weights are on the GPU mixed devices inside torch.export."""
    pytest.importorskip("onnxruntime")
    from exporters.onnx import main_export

    surrogate = surrogate_for(tiny_model())
    on_cpu = main_export(surrogate, tmp_path / "cpu", dtype="fp32", hidden_states_model=None)
    on_gpu = main_export(surrogate.to("cuda"), tmp_path / "cuda", dtype="fp32", hidden_states_model=None)
    for layer in on_cpu.manifest.layers:
        assert (on_gpu.directory / layer.file).read_bytes() == (on_cpu.directory / layer.file).read_bytes()
    assert next(surrogate.parameters()).device.type == "cuda", "the caller's surrogate stays where it was"
