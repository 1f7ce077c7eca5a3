"""ONNX export (`exporters.onnx`): one file per layer, the manifest, validation as a fatal step, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from exporters.manifest import MANIFEST_NAME, read_manifest
from exporters.onnx import ExportValidationError, main_export, validate_export
from exporters.onnx.__main__ import main as cli
from kvzap_eval.errors import CheckpointError, ConfigError

from .onnx_helpers import checkpoint, needs_onnx

needs_onnx()
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture
def exported(tiny_export):
    """The session's fp32 export of a tiny 2-layer MLP surrogate (read-only)."""
    model, surrogate, path, results = tiny_export
    return model, surrogate, path, results["fp32"]


def run_file(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["scores"], {"hidden_states": x.numpy()})[0])


def test_export_writes_one_self_contained_opset20_file_per_layer_and_a_manifest(exported):
    _, _, path, result = exported
    files = sorted(p.name for p in result.directory.iterdir())
    assert files == ["layer_00.onnx", "layer_01.onnx", MANIFEST_NAME], "no external-data side files"
    model = onnx.load(str(result.directory / "layer_00.onnx"))
    assert [(o.domain, o.version) for o in model.opset_import if o.domain == ""] == [("", 20)]
    assert [n.op_type for n in model.graph.node].count("Gelu") == 1
    values = (*model.graph.input, *model.graph.output)
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values]
    assert dims == [["batch", "sequence", 64], ["batch", "sequence", 2]]
    manifest = json.loads((result.directory / MANIFEST_NAME).read_text())
    assert manifest["opset"] == 20 and manifest["dtype"] == "fp32" and manifest["validation"] == "passed"
    shape = {"model_type": "mlp", "input_dim": 64, "output_dim": 2, "hidden_dim": 8, "n_modules": 2}
    assert manifest["surrogate"] == shape
    assert set(manifest["source"]["files"]) == {"config.json", "model.safetensors"}
    assert manifest["source"]["id"] == str(path)
    checks = manifest["layers"][1]["validation"]["checks"]
    assert {c["inputs"] for c in checks} == {"random [4, 256, 64]", "decode [1, 1, 64]"}
    assert all(c["passed"] and c["max_abs_error"] < 1e-4 for c in checks)


def test_each_layer_file_computes_its_own_layer_for_any_batch_and_length(exported):
    _, surrogate, _, result = exported
    for layer_idx in range(2):
        for shape in [(1, 1, 64), (3, 17, 64)]:
            x = torch.randn(shape)
            got = run_file(result.directory / f"layer_{layer_idx:02d}.onnx", x).transpose(1, 2)
            torch.testing.assert_close(got, surrogate(layer_idx, x).detach(), atol=1e-5, rtol=1e-5)


def test_export_is_byte_identical_when_repeated(exported, tmp_path):
    _, _, path, result = exported
    again = main_export(str(path), tmp_path / "again", validate=False)
    assert [a.sha256 for a in again.manifest.layers] == [a.sha256 for a in result.manifest.layers]
    assert again.manifest.validation == "skipped"


@pytest.mark.parametrize("model_type", ["linear", "mlp"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "int8"])
def test_low_precision_exports_validate_against_fp32(tmp_path, model_type, dtype):
    _, _, path = checkpoint(tmp_path, model_type)
    result = main_export(str(path), tmp_path / "onnx", dtype=dtype, hidden_states_model=None, threshold=0.0)
    assert result.manifest.validation == "passed"
    report = result.reports[0]
    assert ("torch bf16" in report.runtime) == (dtype == "bf16"), "onnxruntime CPU cannot run bf16"
    assert all(c.agreement_at_threshold >= {"fp16": 0.995, "bf16": 0.99, "int8": 0.995}[dtype] for c in report.checks)
    assert 0 < max(c.max_abs_error for c in report.checks) < 0.1
    graph = onnx.load(str(result.directory / "layer_00.onnx")).graph
    assert graph.input[0].type.tensor_type.elem_type == {"fp16": 10, "bf16": 16, "int8": 1}[dtype]
    assert ("MatMulNBits" in {n.op_type for n in graph.node}) == (dtype == "int8")


def test_real_hidden_states_from_a_named_model_are_validated(tmp_path):
    model, _, path = checkpoint(tmp_path)
    model.save_pretrained(tmp_path / "llm")
    result = main_export(str(path), tmp_path / "onnx", hidden_states_model=str(tmp_path / "llm"))
    labels = [c.inputs for c in result.reports[0].checks]
    assert "real [1, 512, 64]" in labels
    assert any("random token ids" in line for line in result.manifest.validation_inputs)


def test_a_named_model_of_another_shape_is_refused(tmp_path):
    _, _, path = checkpoint(tmp_path)
    other, _, _ = checkpoint(tmp_path / "o", hidden_size=32)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(CheckpointError, match="input_dim=64 does not match the model's hidden_size=32"):
        main_export(str(path), tmp_path / "onnx", hidden_states_model=str(tmp_path / "other"))


def test_failed_validation_is_fatal_and_leaves_no_manifest(tmp_path, monkeypatch):
    from exporters.onnx import validate

    _, _, path = checkpoint(tmp_path)
    monkeypatch.setitem(validate.TOLERANCES, "fp16", validate.Tolerance(atol=1e-9, rtol=0.0, min_agreement=1.0))
    with pytest.raises(ExportValidationError, match=r"2 of 2 layers failed validation.*--allow-mismatch"):
        main_export(str(path), tmp_path / "onnx", dtype="fp16", hidden_states_model=None)
    assert not (tmp_path / "onnx" / MANIFEST_NAME).exists()
    assert (tmp_path / "onnx" / "layer_00.onnx").exists(), "files stay for inspection"

    kept = main_export(str(path), tmp_path / "onnx", dtype="fp16", hidden_states_model=None, allow_mismatch=True)
    assert read_manifest(kept.directory).validation == "failed (allowed)"
    assert not kept.manifest.layers[0].validation["passed"]


def test_validation_catches_a_file_with_other_weights(exported):
    _, surrogate, _, result = exported
    files = [result.directory / "layer_01.onnx", result.directory / "layer_00.onnx"]  # swapped
    reports = validate_export(files, surrogate, "fp32", 0.0)
    assert [r.passed for r in reports] == [False, False]
    assert "max abs error" in reports[0].summary()


def test_validation_catches_wrong_output_dims(exported):
    _, surrogate, _, result = exported
    files = [result.directory / "layer_00.onnx", result.directory / "layer_01.onnx"]
    three_heads = type(surrogate)(type(surrogate.config)(64, 3, 2, 8))
    reports = validate_export(files, three_heads, "fp32", 0.0)
    expected = "output 'scores' has dims ['batch', 'sequence', 2], expected ['batch', 'sequence', 3]"
    assert reports[0].structure == [expected]
    assert not reports[0].passed and "expected ['batch', 'sequence', 3]" in reports[0].summary()


def test_unknown_dtype_is_one_line(exported, tmp_path):
    _, _, path, _ = exported
    with pytest.raises(ConfigError, match=r"unknown export dtype 'int4': use fp32, fp16, bf16 or int8 \(weight-only\)"):
        main_export(str(path), tmp_path / "onnx", dtype="int4")


def test_hub_id_source_records_the_snapshot_revision(tmp_path, monkeypatch):
    from .test_surrogate import COMMIT, write_fake_cache

    _, surrogate, _ = checkpoint(tmp_path)
    write_fake_cache(tmp_path / "hub", "nvidia/KVzap-mlp-Tiny", surrogate)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = main_export("nvidia/KVzap-mlp-Tiny", tmp_path / "onnx", validate=False)
    assert result.manifest.source.id == "nvidia/KVzap-mlp-Tiny" and result.manifest.source.revision == COMMIT


def test_cli_exports_and_prints_each_layer(exported, tmp_path, capsys):
    _, _, path, _ = exported
    assert cli([str(path), "--out", str(tmp_path / "cli"), "--dtype", "fp16", "--hidden-states-model", "none"]) == 0
    out = capsys.readouterr().out
    assert out.count("ok    layer") == 2 and "validation passed" in out
    assert read_manifest(tmp_path / "cli").dtype == "fp16"


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli([str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: surrogate directory {str(tmp_path / 'missing')!r} does not exist"]
