"""Exports are checked before use (issue 12): files stay inside the export, each file is its manifest slot and the
surrogate's own layer, every manifest field has its type, and the exporter CLIs end every mistake in one line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from exporters import manifest as manifest_module
from exporters.manifest import MANIFEST_NAME, read_manifest
from exporters.onnx import main_export
from exporters.onnx.__main__ import main as onnx_cli
from exporters.source import file_sha256, weights_sha256
from exporters.trt.__main__ import main as trt_cli
from kvzap_eval.errors import ArtifactError
from kvzap_eval.llm.model_info import placement
from kvzap_eval.runtime.backends import make_backend
from kvzap_eval.surrogate import save_surrogate

from .conftest import surrogate_for
from .onnx_helpers import needs_onnx

needs_onnx()


@pytest.fixture
def setup(tiny_export):
    """A tiny LLM, its surrogate checkpoint and the session's fp32 export of it (read-only: copy_export first)."""
    model, surrogate, path, results = tiny_export
    return model, surrogate, path, results["fp32"].directory


def copy_export(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def edit_manifest(directory: Path, edit) -> None:
    """Apply `edit` to the parsed manifest.json of `directory` and write it back."""
    data = json.loads((directory / MANIFEST_NAME).read_text())
    edit(data)
    (directory / MANIFEST_NAME).write_text(json.dumps(data))


def load(setup, directory, surrogate=None):
    model, own, _, _ = setup
    return make_backend("onnxruntime", surrogate or own, placement(model), directory, threads=1)


@pytest.fixture
def hashed(monkeypatch):
    """Every path `exporters.manifest` hashes, in order."""
    seen: list[Path] = []

    def recording(path):
        seen.append(Path(path).resolve())
        return file_sha256(path)

    monkeypatch.setattr(manifest_module, "file_sha256", recording)
    return seen


# ----------------------------------------------------------------------------------- files outside the export


def planted_outside(setup, tmp_path) -> tuple[Path, Path]:
    """(a copy of the export, a valid copy of its layer 0 file outside it): loading that copy would 'work'."""
    directory = copy_export(setup[3], tmp_path / "exports" / "x")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(directory / "layer_00.onnx", outside / "evil.onnx")
    return directory, outside / "evil.onnx"


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_a_manifest_file_outside_the_export_is_refused_before_it_is_read(setup, tmp_path, hashed, kind):
    directory, evil = planted_outside(setup, tmp_path)
    name = "../../outside/evil.onnx" if kind == "relative" else str(evil)
    edit_manifest(directory, lambda m: m["layers"][0].update(file=name))
    expected = "lies outside the export directory" if kind == "relative" else "is an absolute path"
    with pytest.raises(ArtifactError, match=rf"layer 0 file '{name}' named by .*manifest.json' {expected}"):
        load(setup, directory)
    assert hashed == [], "nothing is hashed (or opened) before every file is known to lie inside the export"


def test_a_system_file_named_by_a_manifest_is_never_read(setup, tmp_path, hashed):
    directory = copy_export(setup[3], tmp_path / "x")
    edit_manifest(directory, lambda m: m["layers"][1].update(file="../../../../../../../../etc/passwd"))
    with pytest.raises(ArtifactError, match=r"layer 1 file '\.\./.*etc/passwd' .* lies outside the export directory"):
        load(setup, directory)
    assert Path("/etc/passwd").resolve() not in hashed and hashed == []


def test_a_layer_file_symlinked_outside_the_export_is_refused(setup, tmp_path, hashed):
    directory, evil = planted_outside(setup, tmp_path)
    (directory / "layer_00.onnx").unlink()
    (directory / "layer_00.onnx").symlink_to(evil)
    with pytest.raises(ArtifactError, match=r"layer 0 file 'layer_00.onnx' .* outside the export .*through a symlink"):
        load(setup, directory)
    assert hashed == []


def test_files_in_a_subdirectory_of_the_export_are_fine(setup, tmp_path):
    directory = copy_export(setup[3], tmp_path / "x")
    (directory / "sub").mkdir()
    (directory / "layer_01.onnx").rename(directory / "sub" / "layer_01.onnx")
    edit_manifest(directory, lambda m: m["layers"][1].update(file="sub/../sub/layer_01.onnx"))
    backend = load(setup, directory)
    x = torch.randn(1, 5, 64)
    torch.testing.assert_close(backend(1, x), setup[1](1, x).detach(), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- export identity


def swap_layers(directory: Path) -> None:
    """Swap the two layers' entries (file and hash), as someone 'fixing' a manifest by hand would."""

    def swap(m):
        first, second = m["layers"]
        first["file"], second["file"] = second["file"], first["file"]
        first["sha256"], second["sha256"] = second["sha256"], first["sha256"]

    edit_manifest(directory, swap)


def test_swapped_layer_files_with_rehashed_manifest_are_refused_naming_the_layer(setup, tmp_path):
    directory = copy_export(setup[3], tmp_path / "x")
    swap_layers(directory)
    with pytest.raises(ArtifactError) as error:
        load(setup, directory)
    message = str(error.value)
    assert message.startswith("layer 0 file ") and "layer_01.onnx' was exported as layer 1, not layer 0" in message
    assert "swapped or edited" in message and "re-export" in message and "\n" not in message


def test_swapped_files_whose_layer_metadata_was_rewritten_are_caught_by_their_weights(setup, tmp_path):
    import onnx

    directory = copy_export(setup[3], tmp_path / "x")
    for name, slot in (("layer_00.onnx", "1"), ("layer_01.onnx", "0")):
        model = onnx.load(str(directory / name))
        model.metadata_props[0].value = slot  # the metadata now agrees with the swapped slot
        onnx.save(model, str(directory / name))
    swap_layers(directory)
    edit_manifest(directory, lambda m: [e.update(sha256=file_sha256(directory / e["file"])) for e in m["layers"]])
    with pytest.raises(ArtifactError, match=r"layer 0 file .*layer_01.onnx' does not hold layer 0 of the surrogate"):
        load(setup, directory)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "int8"])
def test_an_export_of_another_surrogate_with_a_lying_manifest_is_refused(setup, tmp_path, dtype):
    model, surrogate, path, _ = setup
    other = surrogate_for(model, seed=9)
    foreign = main_export(other, tmp_path / "foreign", dtype=dtype, validate=False, log=lambda _: None).directory
    lie = {"id": str(path), "weights_sha256": weights_sha256(surrogate)}
    edit_manifest(foreign, lambda m: m["source"].update(lie))
    with pytest.raises(ArtifactError) as error:
        load(setup, foreign)
    message = str(error.value)
    assert message.startswith("layer 0 file ") and "does not hold layer 0 of the surrogate in use" in message
    assert "made from another surrogate although its manifest names this one" in message
    assert "re-export this surrogate (python -m exporters.onnx" in message


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "int8"])
def test_an_export_holds_its_surrogates_weights_in_every_dtype(setup, tmp_path, dtype):
    from exporters.onnx.identity import check_layer_files

    _, surrogate, path, _ = setup
    directory = main_export(str(path), tmp_path / dtype, dtype=dtype, validate=False, log=lambda _: None).directory
    manifest = read_manifest(directory)
    paths = [directory / a.file for a in manifest.layers]
    check_layer_files(manifest, directory, paths, list(surrogate.layers))  # passes: exact (int8: within a step)
    nudged = surrogate_for(setup[0])
    nudged.load_state_dict(surrogate.state_dict())
    with torch.no_grad():
        nudged.layers[1][0].weight[3, 5] += 0.05 if dtype != "int8" else 1.0
    with pytest.raises(ArtifactError, match=r"layer 1 file .* \(parameter '0.weight' \(8, 64\) is not among"):
        check_layer_files(manifest, directory, paths, list(nudged.layers))


def test_a_wide_int8_export_holds_its_surrogates_weights(tmp_path):
    """Found at D=4096: some MatMulNBits weights lie a whole quantisation step off (not half), and must pass."""
    from exporters.onnx.identity import check_layer_files
    from kvzap_eval.surrogate import KVzapSurrogate, SurrogateConfig

    torch.manual_seed(0)
    surrogate = KVzapSurrogate(SurrogateConfig(576, 3, 1, 256)).eval()
    directory = main_export(surrogate, tmp_path / "int8", dtype="int8", validate=False, log=lambda _: None).directory
    manifest = read_manifest(directory)
    check_layer_files(manifest, directory, [directory / "layer_00.onnx"], list(surrogate.layers))


def test_a_manifest_whose_dtype_lies_about_the_files_is_refused(setup, tmp_path):
    directory = copy_export(setup[3], tmp_path / "x")
    edit_manifest(directory, lambda m: m.update(dtype="fp16"))
    with pytest.raises(ArtifactError, match=r"layer 0 file .* does not match its manifest \(input 'hidden_states' has "
                       r"ONNX element type 1, expected fp16"):  # fmt: skip
        load(setup, directory)


def test_a_layer_file_with_external_data_is_refused_before_a_runtime_reads_it(setup, tmp_path):
    import onnx

    directory = copy_export(setup[3], tmp_path / "exports" / "x")
    model = onnx.load(str(directory / "layer_00.onnx"))
    onnx.save(model, str(directory / "layer_00.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)  # fmt: skip
    edit_manifest(directory, lambda m: m["layers"][0].update(sha256=file_sha256(directory / "layer_00.onnx")))
    with pytest.raises(ArtifactError, match=r"layer 0 file .* keeps weights in external data files .* re-export"):
        load(setup, directory)


# --------------------------------------------------------------------------------------- manifest fields


MALFORMED = {
    "file a number": (lambda m: m["layers"][0].update(file=5), r"field 'layers\[0\].file' is 5, expected str"),
    "index a string": (lambda m: m["layers"][1].update(index="1"), r"field 'layers\[1\].index' is '1', expected int"),
    "index out of order": (lambda m: m["layers"][1].update(index=0), r"'layers\[1\].index' is 0, expected 1"),
    "hash not hex": (lambda m: m["layers"][0].update(sha256="xyz"), r"'layers\[0\].sha256' is 'xyz', expected 64"),
    "missing file key": (lambda m: m["layers"][0].pop("file"), r"field 'layers\[0\].file' is missing"),
    "layers not a list": (lambda m: m.update(layers={"0": 1}), r"field 'layers' is .*, expected list"),
    "layer not an object": (lambda m: m["layers"].__setitem__(0, "layer_00.onnx"), r"'layers\[0\]' is 'layer_00"),
    "one layer too few": (lambda m: m["layers"].pop(), r"field 'layers' has 1 entries for a surrogate of 2"),
    "same file twice": (lambda m: m["layers"][1].update(file="./layer_00.onnx"), r"names 'layer_00.onnx' for more"),
    "unknown dtype": (lambda m: m.update(dtype="int4"), r"field 'dtype' is 'int4', expected one of fp32, fp16"),
    "threshold a string": (lambda m: m.update(threshold="NaN"), r"field 'threshold' is 'NaN', expected float"),
    "threshold a bool": (lambda m: m.update(threshold=True), r"field 'threshold' is True, expected float"),
    "negative dim": (lambda m: m["surrogate"].update(input_dim=-64), r"not a valid surrogate shape .*input_dim=-64"),
    "dim a float": (lambda m: m["surrogate"].update(output_dim=2.0), r"'surrogate.output_dim' is 2.0, expected int"),
    "model type lies": (lambda m: m["surrogate"].update(model_type="linear"), r"'surrogate.model_type' is 'linear'"),
    "input dims lie": (lambda m: m["input"].update(dims=["batch", "sequence", 32]), r"field 'input' is .*expected"),
    "unknown validation": (lambda m: m.update(validation="yes"), r"field 'validation' is 'yes', expected one of"),
    "source not an object": (lambda m: m.update(source="x"), r"field 'source' is 'x', expected dict"),
    "weights hash missing": (lambda m: m["source"].pop("weights_sha256"), r"'source.weights_sha256' is missing"),
    "opset a string": (lambda m: m.update(opset="20"), r"field 'opset' is '20', expected int"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_a_manifest_field_of_the_wrong_type_or_value_is_one_line(setup, tmp_path, case):
    edit, expected = MALFORMED[case]
    directory = copy_export(setup[3], tmp_path / "x")
    edit_manifest(directory, edit)
    with pytest.raises(ArtifactError, match=r"manifest.json' is not a valid export manifest: .*" + expected) as error:
        load(setup, directory)
    assert "\n" not in str(error.value) and str(error.value).endswith(": re-export")


@pytest.mark.parametrize("text", ["[1, 2]", "null", '"manifest"', "[" * 100000])
def test_a_manifest_that_is_json_but_not_an_object_is_one_line(setup, tmp_path, text):
    directory = copy_export(setup[3], tmp_path / "x")
    (directory / MANIFEST_NAME).write_text(text)
    with pytest.raises(ArtifactError, match=r"manifest.json' (has format|is not a readable export manifest)"):
        load(setup, directory)


# ------------------------------------------------------------------------------------------ exporter CLIs


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def onnx_args(path, *extra) -> list[str]:
    return [str(path), "--hidden-states-model", "none", "--no-validate", *extra]


def test_onnx_cli_out_that_is_a_file_is_one_line_before_loading(setup, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert onnx_cli(onnx_args(setup[2], "--out", str(tmp_path / "file"))) == 1
    line = one_error_line(capsys)
    assert line.startswith("error: --out '") and line.endswith("is a file, not a directory: pass a writable directory")
    assert onnx_cli(onnx_args(setup[2], "--out", str(tmp_path / "file" / "sub"))) == 1
    assert "lies under the file" in one_error_line(capsys)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_onnx_cli_out_that_cannot_be_written_is_one_line(setup, capsys):
    assert onnx_cli(onnx_args(setup[2], "--out", "/proc/kvzap-eval-export")) == 1
    assert "cannot be created or written" in one_error_line(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_onnx_cli_out_in_a_read_only_directory_is_one_line(setup, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert onnx_cli(onnx_args(setup[2], "--out", str(locked / "onnx"))) == 1
    assert "cannot be created or written" in one_error_line(capsys)


def test_onnx_cli_missing_hidden_states_model_fails_before_exporting(setup, tmp_path, capsys):
    out = tmp_path / "onnx"
    assert onnx_cli([str(setup[2]), "--out", str(out), "--hidden-states-model", str(tmp_path / "nope")]) == 1
    assert one_error_line(capsys) == (
        f"error: --hidden-states-model {str(tmp_path / 'nope')!r} does not exist: pass an LLM directory, a hub id in "
        "the local cache, or 'none' (random inputs only)"
    )
    assert not out.exists() or not list(out.iterdir()), "nothing was exported"
    (tmp_path / "empty").mkdir()
    assert onnx_cli([str(setup[2]), "--out", str(out), "--hidden-states-model", str(tmp_path / "empty")]) == 1
    assert "does not load as a causal LM" in one_error_line(capsys)


def test_onnx_cli_uncached_hidden_states_hub_model_offline_is_one_line(setup, tmp_path):
    """In a fresh process: huggingface_hub reads HF_HUB_OFFLINE once, at import."""
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # fmt: skip
    argv = [str(setup[2]), "--out", str(tmp_path / "o"), "--hidden-states-model", "org/uncached-llm"]
    run = subprocess.run([sys.executable, "-m", "exporters.onnx", *argv], env=env, capture_output=True, text=True)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.strip().splitlines() == [run.stderr.strip()], "one line, no traceback"
    assert run.stderr.startswith("error: --hidden-states-model 'org/uncached-llm' does not load as a causal LM")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--dtype", "int4"], "unknown export dtype 'int4'"),
        (["--threshold", "nan"], "threshold must be finite"),
        (["--threshold", "inf"], "threshold must be finite"),
    ],
)
def test_onnx_cli_bad_settings_are_one_line(setup, tmp_path, capsys, extra, expected):
    assert onnx_cli(onnx_args(setup[2], "--out", str(tmp_path / "o"), *extra)) == 1
    assert expected in one_error_line(capsys)


def test_onnx_cli_unknown_hub_id_offline_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert onnx_cli(["nvidia/KVzap-mlp-Nope", "--out", str(tmp_path / "o")]) == 1
    assert "'nvidia/KVzap-mlp-Nope' is not in the local Hugging Face cache and HF_HUB_OFFLINE=1" in one_error_line(
        capsys
    )


def test_onnx_cli_corrupt_surrogate_checkpoint_is_one_line(setup, tmp_path, capsys):
    broken = save_surrogate(setup[1], tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    assert onnx_cli(onnx_args(broken, "--out", str(tmp_path / "o"))) == 1
    assert "are not a readable safetensors file" in one_error_line(capsys)


def test_onnx_cli_revision_of_a_local_directory_is_refused(setup, tmp_path, capsys):
    assert onnx_cli(onnx_args(setup[2], "--out", str(tmp_path / "o"), "--revision", "v2")) == 1
    assert "--revision v2 applies to hub ids, not to the local directory" in one_error_line(capsys)


def test_onnx_cli_argument_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        onnx_cli(["x", "--threshold", "high"])
    assert exit_.value.code == 2 and "argument --threshold: invalid float value" in capsys.readouterr().err


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """TensorRT 'installed' (the CLI gets past its import) on a machine torch sees no GPU on."""
    import types

    from exporters.trt import build

    monkeypatch.setattr(build, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.8.0"))


def test_trt_cli_directory_that_is_neither_an_export_nor_a_checkpoint_is_one_line(fake_tensorrt, tmp_path, capsys):
    (tmp_path / "onnx").mkdir()
    assert trt_cli([str(tmp_path / "onnx")]) == 1
    line = one_error_line(capsys)
    assert "is neither an ONNX export (no manifest.json) nor a surrogate checkpoint (no config.json)" in line


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--max-seq", "0"], "TensorRT profile max_seq=0 must be a positive integer"),
        (["--max-batch", "-2"], "TensorRT profile max_batch=-2 must be a positive integer"),
        (["--opt-seq", "9000", "--max-seq", "4096"], "opt_seq=9000 must lie in 1..max_seq=4096"),
        (["--workspace-gb", "nan"], "--workspace-gb nan must be a positive number"),
        (["--workspace-gb", "0"], "--workspace-gb 0.0 must be a positive number"),
        (["--device", "-1"], "--device -1 must be a CUDA device index"),
        (["--dtype", "int8"], "--dtype int8 is weight-only"),
        (["--dtype", "fp8"], "unknown export dtype 'fp8'"),
    ],
)
def test_trt_cli_bad_settings_are_one_line(fake_tensorrt, setup, capsys, extra, expected):
    assert trt_cli([str(setup[2]), *extra]) == 1
    assert expected in one_error_line(capsys)


def test_trt_cli_out_that_is_a_file_is_one_line(fake_tensorrt, setup, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for option in ("--out", "--onnx-dir"):
        assert trt_cli([str(setup[3]), option, str(tmp_path / "file")]) == 1
        assert f"error: {option} '" in one_error_line(capsys)


def test_trt_cli_missing_source_is_one_line(fake_tensorrt, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert trt_cli([str(tmp_path / "missing"), "--onnx-dir", str(tmp_path / "o")]) == 1
    assert "does not exist" in one_error_line(capsys)
    assert trt_cli(["nvidia/KVzap-mlp-Nope", "--onnx-dir", str(tmp_path / "o")]) == 1
    assert "HF_HUB_OFFLINE=1" in one_error_line(capsys)


def test_trt_cli_on_an_export_with_swapped_layers_is_one_line(fake_tensorrt, setup, tmp_path, capsys):
    directory = copy_export(setup[3], tmp_path / "x")
    swap_layers(directory)
    assert trt_cli([str(directory)]) == 1
    assert "was exported as layer 1, not layer 0" in one_error_line(capsys)


# ------------------------------------------------------------------------------------------ backend settings


def test_an_artifact_directory_that_is_a_file_says_so(setup, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match=r"artifact directory '.*file' is a file, not an export directory"):
        load(setup, tmp_path / "file")


@pytest.mark.parametrize("name", ["torch", "cuda_graph"])
def test_an_artifact_directory_for_a_backend_that_reads_none_is_refused(setup, name):
    from kvzap_eval.errors import ConfigError

    model, surrogate, _, export = setup
    with pytest.raises(ConfigError, match=f"the {name} backend .* takes no artifact directory"):
        make_backend(name, surrogate, placement(model), export)


@pytest.mark.parametrize("threads", [0, -2, True, 1.5])
def test_onnxruntime_threads_must_be_a_positive_whole_number(setup, threads):
    from kvzap_eval.errors import ConfigError
    from kvzap_eval.runtime.backends.onnxruntime_backend import OrtSettings

    with pytest.raises(ConfigError, match=rf"onnxruntime threads={threads!r} must be a whole number >= 1"):
        OrtSettings(threads=threads)


def test_an_unwritable_export_cache_is_one_line(setup, tmp_path, monkeypatch):
    from kvzap_eval.errors import ConfigError

    (tmp_path / "cache").write_text("a file where the cache should be")
    monkeypatch.setenv("KVZAP_EVAL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"the kvzap-eval cache '.*' lies under the file .*set KVZAP_EVAL_CACHE"):
        load(setup, None)


def test_a_tampered_export_in_the_cache_says_how_to_make_it_again(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("KVZAP_EVAL_CACHE", str(tmp_path / "cache"))
    load(setup, None)  # exported into the cache on first use
    (cached,) = (tmp_path / "cache" / "onnx").iterdir()
    swap_layers(cached)
    with pytest.raises(
        ArtifactError, match=rf"not layer 0: .*kvzap-eval's cache: remove '{cached}' and it is made again"
    ):
        load(setup, None)
    shutil.rmtree(cached)
    assert load(setup, None).manifest.validation == "passed"
