"""The onnxruntime scorer backend: same scores and evictions as torch, the export cache, and every bad input."""

from __future__ import annotations

import json

import pytest
import torch

from exporters.manifest import MANIFEST_NAME
from exporters.onnx import main_export
from exporters.onnx import ort as ort_import
from kvzap_eval import build_method, compress
from kvzap_eval.errors import ArtifactError, ConfigError, MissingExtraError
from kvzap_eval.llm.model_info import placement
from kvzap_eval.runtime.backends import make_backend
from kvzap_eval.runtime.backends import onnxruntime_backend as ortb
from kvzap_eval.runtime.methods import MethodConfig

from .conftest import left_padded, surrogate_for, tiny_model
from .onnx_helpers import needs_onnx

needs_onnx()


@pytest.fixture
def setup(tiny_export):
    """A tiny LLM, its surrogate checkpoint, and the session's fp32 / fp16 exports of it (read-only)."""
    model, surrogate, path, results = tiny_export
    return model, surrogate, path, {dtype: result.directory for dtype, result in results.items()}


def held(session) -> list[set[tuple[int, int, int]]]:
    """Per layer, the (batch, head, position) entries the cache still holds."""
    result = []
    for layer in session.cache.layers:
        index = torch.nonzero(layer.positions >= 0)
        result.append({(b, h, int(layer.positions[b, h, s])) for b, h, s in index.tolist()})
    return result


def test_scores_equal_the_torch_backend_for_prefill_and_decode(setup):
    model, surrogate, _, exports = setup
    ours = make_backend("onnxruntime", surrogate, placement(model), exports["fp32"], threads=1)
    reference = make_backend("torch", surrogate, placement(model))
    for shape in [(1, 1, 64), (3, 40, 64)]:
        x = torch.randn(shape)
        for layer_idx in range(2):
            got = ours(layer_idx, x)
            assert got.shape == (shape[0], 2, shape[1]) and got.dtype == torch.float32
            torch.testing.assert_close(got, reference(layer_idx, x), atol=1e-5, rtol=1e-5)
    assert ours.threads == 1 and ours(0, torch.randn(1, 0, 64)).shape == (1, 2, 0)


def test_non_contiguous_hidden_states_are_accepted(setup):
    model, surrogate, _, exports = setup
    ours = make_backend("onnxruntime", surrogate, placement(model), exports["fp32"])
    x = torch.randn(40, 3, 64).transpose(0, 1)
    torch.testing.assert_close(ours(1, x), surrogate(1, x).detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lengths", [[60], [60, 45]], ids=["batch1", "batch2-padded"])
def test_generation_evicts_exactly_what_the_torch_backend_evicts(setup, lengths):
    model, _, path, exports = setup
    ids, mask = left_padded(lengths)
    runs = {}
    for backend, artifacts in (("torch", {}), ("onnxruntime", {"backend_dir": str(exports["fp32"])})):
        method = build_method(model, surrogate=str(path), threshold=0.0, window=8, backend=backend, **artifacts)
        with compress(model, method) as session:
            tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        runs[backend] = tokens, held(session), session.stats().achieved_compression_ratio
    assert torch.equal(runs["torch"][0], runs["onnxruntime"][0])
    assert runs["torch"][1] == runs["onnxruntime"][1]
    assert 0.1 < runs["torch"][2] < 0.9


def test_fp16_export_runs_fp32_layers_by_casting(setup):
    model, surrogate, _, exports = setup
    with pytest.warns(UserWarning, match="fp16 export runs layers of another dtype"):
        ours = make_backend("onnxruntime", surrogate, placement(model), exports["fp16"])
    x = torch.randn(2, 30, 64)
    got, ref = ours(0, x), surrogate(0, x).detach()
    assert got.dtype == torch.float32 and (got - ref).abs().max() < 2e-2
    assert ((got < 0) == (ref < 0)).float().mean() > 0.99


def test_int8_weight_only_export_runs_fp32_layers_and_agrees(setup, tmp_path):
    model, surrogate, path, _ = setup
    directory = main_export(str(path), tmp_path / "int8", dtype="int8", hidden_states_model=None).directory
    ours = make_backend("onnxruntime", surrogate, placement(model), directory)
    x = torch.randn(2, 30, 64)
    got, ref = ours(1, x), surrogate(1, x).detach()
    assert got.dtype == torch.float32 and 0 < (got - ref).abs().max() < 0.1
    assert ((got < 0) == (ref < 0)).float().mean() > 0.98


def test_no_artifact_directory_exports_into_the_cache_once(setup, tmp_path, monkeypatch):
    model, surrogate, _, _ = setup
    monkeypatch.setenv("KVZAP_EVAL_CACHE", str(tmp_path))
    first = make_backend("onnxruntime", surrogate, placement(model))
    assert first.directory.parent == tmp_path / "onnx" and first.manifest.dtype == "fp32"

    import exporters.onnx

    with monkeypatch.context() as patch:
        patch.setattr(exporters.onnx, "main_export", lambda *a, **k: pytest.fail("exported twice"))
        again = make_backend("onnxruntime", surrogate, placement(model))
    assert again.directory == first.directory
    other = make_backend("onnxruntime", surrogate_for(model, seed=7), placement(model))
    assert other.directory != first.directory, "keyed by the weights"
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == sorted([first.directory.name, other.directory.name])


def test_method_config_passes_backend_settings(setup):
    model, _, path, exports = setup
    method = build_method(model, surrogate=str(path), backend="onnxruntime", backend_dir=str(exports["fp32"]),
                          backend_threads=1)  # fmt: skip
    assert method.scorer.backend.name == "onnxruntime" and method.scorer.backend.threads == 1
    with pytest.raises(ConfigError, match="unknown scorer backend 'onnx'"):
        MethodConfig(backend="onnx")


# --------------------------------------------------------------------------------------------- bad input


def copy_export(src, dst):
    import shutil

    return shutil.copytree(src, dst)


def test_corrupt_layer_file_is_refused(setup, tmp_path):
    model, surrogate, _, exports = setup
    directory = copy_export(exports["fp32"], tmp_path / "x")
    data = bytearray((directory / "layer_01.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (directory / "layer_01.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"layer 1 file .* does not match its manifest \(corrupt, truncated"):
        make_backend("onnxruntime", surrogate, placement(model), directory)


def test_truncated_file_with_a_matching_hash_is_refused_before_any_session(setup, tmp_path):
    from exporters.source import file_sha256

    model, surrogate, _, exports = setup
    directory = copy_export(exports["fp32"], tmp_path / "x")
    path = directory / "layer_00.onnx"
    path.write_bytes(path.read_bytes()[:200])
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    manifest["layers"][0]["sha256"] = file_sha256(path)  # someone "fixed" the manifest
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"layer 0 file .*layer_00.onnx' is not a readable ONNX file .*re-export"):
        make_backend("onnxruntime", surrogate, placement(model), directory)


def test_missing_layer_file_is_named(setup, tmp_path):
    model, surrogate, _, exports = setup
    directory = copy_export(exports["fp32"], tmp_path / "x")
    (directory / "layer_01.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"layer 1 file .*layer_01.onnx' is missing"):
        make_backend("onnxruntime", surrogate, placement(model), directory)


def test_missing_or_broken_manifest_is_one_line(setup, tmp_path):
    model, surrogate, _, exports = setup
    with pytest.raises(ArtifactError, match="does not exist"):
        make_backend("onnxruntime", surrogate, placement(model), tmp_path / "nowhere")
    directory = copy_export(exports["fp32"], tmp_path / "x")
    (directory / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ArtifactError, match="is not a readable export manifest"):
        make_backend("onnxruntime", surrogate, placement(model), directory)
    (directory / MANIFEST_NAME).unlink()
    with pytest.raises(ArtifactError, match="has no manifest.json: export the surrogate there first"):
        make_backend("onnxruntime", surrogate, placement(model), directory)


def test_manifest_for_another_model_is_refused(setup):
    _, _, _, exports = setup
    bigger = tiny_model(hidden_size=32, num_hidden_layers=3)
    mismatch = "input_dim=64 where the surrogate has 32.*n_modules=2 where the surrogate has 3"
    with pytest.raises(ArtifactError, match=mismatch):
        make_backend("onnxruntime", surrogate_for(bigger), placement(bigger), exports["fp32"])


def test_manifest_for_other_weights_of_the_same_shape_is_refused(setup):
    model, _, _, exports = setup
    with pytest.raises(ArtifactError, match=r"weights \w{12} \(from .*\) where the surrogate in use has weights"):
        make_backend("onnxruntime", surrogate_for(model, seed=9), placement(model), exports["fp32"])


def test_layer_count_must_match_the_model(setup):
    model, surrogate, _, exports = setup
    with pytest.raises(ArtifactError, match="2 layer files where the model has 1 decoder layers"):
        make_backend("onnxruntime", surrogate, placement(model)[:1], exports["fp32"])


def test_bf16_export_is_refused_on_cpu(setup, tmp_path):
    model, surrogate, path, _ = setup
    directory = main_export(str(path), tmp_path / "bf16", dtype="bf16", hidden_states_model=None).directory
    with pytest.raises(ConfigError, match="bf16, which onnxruntime cannot run on CPU"):
        make_backend("onnxruntime", surrogate, placement(model), directory)


def test_both_onnxruntime_flavours_installed_is_detected_and_explained(setup, monkeypatch):
    model, surrogate, _, exports = setup
    versions = {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.32.0"}

    def version(name):
        if name in versions:
            return versions[name]
        raise ort_import.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(ort_import.metadata, "version", version)
    with pytest.raises(ConfigError) as error:
        make_backend("onnxruntime", surrogate, placement(model), exports["fp32"])
    message = str(error.value)
    assert "onnxruntime 1.32.0, onnxruntime-gpu 1.32.0 are all installed" in message
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in message and "\n" not in message


def test_missing_onnxruntime_names_the_extra(setup, monkeypatch):
    model, surrogate, _, exports = setup
    monkeypatch.setattr(ort_import, "installed_onnxruntime", dict)
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)
    with pytest.raises(MissingExtraError, match=r"onnxruntime is not installed: pip install 'kvzap-eval\[onnx\]'"):
        make_backend("onnxruntime", surrogate, placement(model), exports["fp32"])


def test_cuda_layers_without_the_cuda_provider_are_refused_before_any_export(setup, tmp_path, monkeypatch):
    """Found on an H200 with the CPU-only onnxruntime: the backend exported first and failed inside the exporter."""
    model, surrogate, _, _ = setup
    monkeypatch.setenv("KVZAP_EVAL_CACHE", str(tmp_path))
    monkeypatch.setattr(ortb.import_onnxruntime(), "get_available_providers", lambda: ["CPUExecutionProvider"])
    cuda = [(torch.device("cuda", 0), torch.float32)] * surrogate.config.n_modules
    with pytest.raises(MissingExtraError, match=r"onnxruntime-gpu .*kvzap-eval\[onnx-gpu\]"):
        make_backend("onnxruntime", surrogate, cuda)
    assert list(tmp_path.iterdir()) == [], "nothing may be exported for a backend that cannot run"


def test_an_automatic_export_that_fails_validation_says_it_was_discarded(setup, tmp_path, monkeypatch):
    from exporters.onnx import ExportValidationError, validate

    model, surrogate, _, _ = setup
    monkeypatch.setenv("KVZAP_EVAL_CACHE", str(tmp_path))
    monkeypatch.setitem(validate.TOLERANCES, "fp32", validate.Tolerance(atol=1e-12, rtol=0.0, min_agreement=1.0))
    with pytest.raises(ExportValidationError) as error:
        make_backend("onnxruntime", surrogate, placement(model))
    message = str(error.value)
    assert message.startswith("the automatic fp32 export of this surrogate was discarded: 2 of 2 layers failed")
    assert "--allow-mismatch --out DIR" in message and "backend_dir=DIR" in message and "left in" not in message
    assert not list((tmp_path / "onnx").iterdir()), "nothing half-exported stays in the cache"
