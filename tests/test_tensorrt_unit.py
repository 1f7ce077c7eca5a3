"""TensorRT pieces that do not need TensorRT: profiles, engine cache keys, stale-engine detection, error paths.

`ensure_engines` is driven with a stand-in `tensorrt` module and builder, so the cache logic (reuse, rebuild for
another TensorRT or GPU, forced rebuild) is pinned here; building and running real engines is `tests/gpu/`'s job.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from exporters.trt import (
    EngineKey,
    EngineProfiles,
    find_engine,
    make_key,
    stale_engines,
    store_engine,
)
from exporters.trt import build as trt_build
from exporters.trt.__main__ import main as trt_cli
from exporters.trt.cache import timing_cache_path
from kvzap_eval.errors import ConfigError, MissingExtraError
from kvzap_eval.llm.model_info import placement
from kvzap_eval.runtime.backends import make_backend
from kvzap_eval.runtime.backends.tensorrt_backend import export_dtype_for

from .conftest import surrogate_for, tiny_model

PROFILES = EngineProfiles().to_json(4096)


def key(**changes) -> EngineKey:
    fields = {"tensorrt_version": "10.8.0", "gpu_name": "NVIDIA H100 80GB HBM3", "capability": (9, 0), "dtype": "bf16",
              "profiles": PROFILES, "onnx_sha256": "ab" * 32}  # fmt: skip
    return make_key(**{**fields, **changes})


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)


# ------------------------------------------------------------------------------------------------- profiles


def test_decode_profile_is_static_and_prefill_spans_one_to_max_seq():
    profiles = EngineProfiles(max_seq=32768)
    assert profiles.decode(576) == ((1, 1, 576),) * 3
    assert profiles.prefill(576) == ((1, 1, 576), (1, 4096, 576), (1, 32768, 576))
    assert EngineProfiles(max_seq=1000).prefill(8)[1] == (1, 1000, 8), "opt never exceeds max"
    assert EngineProfiles(max_seq=8192, opt_seq=8192, max_batch=4).prefill(8) == ((1, 1, 8), (1, 8192, 8), (4, 8192, 8))


def test_inputs_are_routed_to_the_profile_that_covers_them():
    profiles = EngineProfiles(max_seq=4096, max_batch=2)
    assert profiles.profile_for((1, 1, 8)) == 0
    assert profiles.profile_for((2, 1, 8)) == 1 and profiles.profile_for((1, 4096, 8)) == 1
    with pytest.raises(ConfigError, match=r"shape \[1, 4097, 8\] exceeds .* rebuild the engines with a larger"):
        profiles.profile_for((1, 4097, 8))


@pytest.mark.parametrize(
    "bad",
    [
        {"max_seq": 0},
        {"max_batch": -1},
        {"opt_seq": 5, "max_seq": 4},
        {"max_seq": 1.5},
        {"max_batch": True},
        {"opt_seq": True},
    ],
)
def test_bad_profiles_are_refused(bad):
    with pytest.raises(ConfigError, match="TensorRT profile"):
        EngineProfiles(**bad)


# --------------------------------------------------------------------------------------------- cache keys


def test_engine_key_changes_with_everything_an_engine_depends_on():
    base = key()
    assert key().digest == base.digest, "stable"
    variants = [key(tensorrt_version="10.9.0"), key(gpu_name="NVIDIA A100-SXM4-80GB"), key(capability=(8, 0)),
                key(dtype="fp16"), key(profiles=EngineProfiles(max_seq=8192).to_json(4096)),
                key(onnx_sha256="cd" * 32)]  # fmt: skip
    assert len({v.digest for v in variants} | {base.digest}) == len(variants) + 1
    assert EngineKey.from_json(base.to_json()) == base


def test_key_differences_are_said_in_words():
    here, there = key(), key(tensorrt_version="10.3.0", gpu_name="NVIDIA A100-SXM4-80GB", capability=(8, 0))
    assert here.differences(there) == [
        "TensorRT 10.3.0 instead of 10.8.0",
        "GPU NVIDIA A100-SXM4-80GB instead of NVIDIA H100 80GB HBM3",
        "compute capability 8.0 instead of 9.0",
    ]


def test_cached_engine_is_found_only_under_its_own_key(tmp_path):
    here = key()
    path = store_engine(tmp_path, 3, here, b"engine bytes")
    assert find_engine(tmp_path, 3, here) == path and path.read_bytes() == b"engine bytes"
    assert find_engine(tmp_path, 4, here) is None
    elsewhere = key(gpu_name="NVIDIA A100-SXM4-80GB", capability=(8, 0))
    assert find_engine(tmp_path, 3, elsewhere) is None
    assert [(p, k) for p, k in stale_engines(tmp_path, 3, elsewhere)] == [(path, here)]
    path.with_suffix(".json").write_text("{broken")
    assert find_engine(tmp_path, 3, here) is None, "an unreadable sidecar never vouches for an engine"


def test_timing_cache_is_one_file_per_tensorrt_and_gpu(tmp_path):
    a = timing_cache_path(tmp_path, "10.8.0", "NVIDIA H100 80GB HBM3")
    assert a.name == "timing-NVIDIA-H100-80GB-HBM3-trt10.8.0.cache"
    assert a != timing_cache_path(tmp_path, "10.8.0", "NVIDIA A100") != timing_cache_path(tmp_path, "10.9.0", "x")


# ---------------------------------------------------------------------------------- ensure_engines (stubbed)


@pytest.fixture
def stub_trt(monkeypatch):
    """A stand-in `tensorrt` module and builder: records which layers get built."""
    built: list[str] = []
    fake = types.SimpleNamespace(__version__="10.8.0")
    monkeypatch.setattr(trt_build, "import_tensorrt", lambda: fake)
    monkeypatch.setattr(trt_build, "gpu_identity", lambda device=0: ("NVIDIA H100 80GB HBM3", (9, 0)))

    def build(trt, onnx_path, onnx_bytes, profiles, dim, timing_cache, workspace):
        assert onnx_bytes == onnx_path.read_bytes()
        built.append(onnx_path.name)
        timing_cache.write_bytes(b"timings")
        return f"engine of {onnx_path.name} for TensorRT {trt.__version__}".encode()

    monkeypatch.setattr(trt_build, "build_engine", build)
    return fake, built


@pytest.fixture
def onnx_export(tiny_export):
    """The session's fp32 ONNX export (read-only: engines go to each test's own directory)."""
    return tiny_export[3]["fp32"].directory


def test_engines_are_built_once_then_reused(stub_trt, onnx_export, tmp_path):
    _, built = stub_trt
    first = trt_build.ensure_engines(onnx_export, tmp_path)
    assert built == ["layer_00.onnx", "layer_01.onnx"] and len(first.paths) == 2
    assert first.profiles.decode(64) == ((1, 1, 64),) * 3
    second = trt_build.ensure_engines(onnx_export, tmp_path)
    assert built == ["layer_00.onnx", "layer_01.onnx"] and second.paths == first.paths
    trt_build.ensure_engines(onnx_export, tmp_path, rebuild={1})
    assert built[-1] == "layer_01.onnx" and len(built) == 3
    assert (tmp_path / "timing-NVIDIA-H100-80GB-HBM3-trt10.8.0.cache").read_bytes() == b"timings"


def test_engine_from_another_tensorrt_or_gpu_is_detected_and_rebuilt(stub_trt, onnx_export, tmp_path, monkeypatch):
    fake, built = stub_trt
    trt_build.ensure_engines(onnx_export, tmp_path)
    fake.__version__ = "10.9.0"
    monkeypatch.setattr(trt_build, "gpu_identity", lambda device=0: ("NVIDIA A100-SXM4-80GB", (8, 0)))
    messages: list[str] = []
    rebuilt = trt_build.ensure_engines(onnx_export, tmp_path, log=messages.append)
    assert len(built) == 4
    assert messages[0].startswith("layer 0: layer_00-") and messages[0].endswith(
        "was built for TensorRT 10.8.0 instead of 10.9.0, GPU NVIDIA H100 80GB HBM3 instead of NVIDIA A100-SXM4-80GB, "
        "compute capability 9.0 instead of 8.0: rebuilding"
    )
    assert rebuilt.paths[0].read_bytes() == b"engine of layer_00.onnx for TensorRT 10.9.0"


def test_int8_weight_only_exports_are_refused_for_tensorrt(stub_trt, tmp_path):
    from exporters.onnx import main_export

    from .onnx_helpers import checkpoint

    _, _, path = checkpoint(tmp_path)
    directory = main_export(str(path), tmp_path / "int8", dtype="int8", validate=False).directory
    with pytest.raises(ConfigError, match="int8 weight-only .* which TensorRT cannot parse"):
        trt_build.ensure_engines(directory, tmp_path / "engines")


# --------------------------------------------------------------------------------------------- error paths


def test_cli_without_tensorrt_stops_with_one_line_before_exporting(no_tensorrt, tmp_path, capsys):
    assert trt_cli(["nvidia/KVzap-mlp-Qwen3-8B", "--onnx-dir", str(tmp_path / "onnx")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["error: tensorrt is not installed: pip install 'kvzap-eval[trt]'"]
    assert not (tmp_path / "onnx").exists()


def test_backend_without_tensorrt_names_the_extra(no_tensorrt):
    model = tiny_model()
    with pytest.raises(MissingExtraError, match=r"pip install 'kvzap-eval\[trt\]'"):
        make_backend("tensorrt", surrogate_for(model), placement(model))


def test_backend_needs_cuda_layers(monkeypatch):
    monkeypatch.setattr(trt_build, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.8.0"))
    model = tiny_model()
    with pytest.raises(ConfigError, match="needs every decoder layer on a CUDA device"):
        make_backend("tensorrt", surrogate_for(model), placement(model))


def test_engines_follow_the_layers_dtype():
    cpu = torch.device("cpu")
    assert export_dtype_for([(cpu, torch.bfloat16)] * 2) == "bf16"
    assert export_dtype_for([(cpu, torch.float16)]) == "fp16"
    assert export_dtype_for([(cpu, torch.float32), (cpu, torch.bfloat16)]) == "fp32"


def test_cuda_graph_backend_refuses_cpu_layers():
    model = tiny_model()
    with pytest.raises(ConfigError, match="cuda_graph backend needs every decoder layer on a CUDA device"):
        make_backend("cuda_graph", surrogate_for(model), placement(model))


# ------------------------------------------------------------------------------- engines their sidecars vouch for


def test_sidecar_records_the_layer_the_onnx_hash_and_the_engine_hash(stub_trt, onnx_export, tmp_path):
    import hashlib
    import json

    from exporters.manifest import read_manifest

    engines = trt_build.ensure_engines(onnx_export, tmp_path)
    for layer, (path, artifact) in enumerate(zip(engines.paths, read_manifest(onnx_export).layers)):
        record = json.loads(path.with_suffix(".json").read_text())
        assert record["layer"] == layer and record["onnx_sha256"] == artifact.sha256
        assert record["engine_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("lie", ["engine bytes replaced", "sidecar of another layer", "no engine hash"])
def test_an_engine_its_sidecar_does_not_vouch_for_is_rebuilt(stub_trt, onnx_export, tmp_path, lie):
    import json

    _, built = stub_trt
    engines = trt_build.ensure_engines(onnx_export, tmp_path)
    path, sidecar = engines.paths[1], engines.paths[1].with_suffix(".json")
    record = json.loads(sidecar.read_text())
    if lie == "engine bytes replaced":
        path.write_bytes(engines.paths[0].read_bytes())  # layer 0's engine under layer 1's name
    elif lie == "sidecar of another layer":
        sidecar.write_text(json.dumps({**record, "layer": 0}))
    else:
        sidecar.write_text(json.dumps({k: v for k, v in record.items() if k != "engine_sha256"}))
    messages: list[str] = []
    again = trt_build.ensure_engines(onnx_export, tmp_path, log=messages.append)
    assert built == ["layer_00.onnx", "layer_01.onnx", "layer_01.onnx"], "only the engine in doubt is rebuilt"
    assert messages == [messages[0]] and messages[0].startswith("layer 1: the cached engine is not used: ")
    assert again.paths[1].read_bytes() == b"engine of layer_01.onnx for TensorRT 10.8.0"


def test_an_engine_replaced_after_it_was_checked_is_refused_when_read(stub_trt, onnx_export, tmp_path):
    from exporters.trt.cache import read_engine
    from kvzap_eval.errors import ArtifactError

    engines = trt_build.ensure_engines(onnx_export, tmp_path)
    assert read_engine(engines.paths[0], 0) == engines.paths[0].read_bytes()
    with pytest.raises(ArtifactError, match="no longer matches its sidecar for layer 1"):
        read_engine(engines.paths[0], 1)
    engines.paths[0].write_bytes(b"something else")
    with pytest.raises(ArtifactError, match=r"changed after it was checked .*rebuild the engines"):
        read_engine(engines.paths[0], 0)


def test_an_engine_symlinked_outside_the_engine_directory_is_rebuilt(stub_trt, onnx_export, tmp_path):
    _, built = stub_trt
    engines = trt_build.ensure_engines(onnx_export, tmp_path / "engines")
    outside = tmp_path / "elsewhere.engine"
    outside.write_bytes(engines.paths[0].read_bytes())
    engines.paths[0].unlink()
    engines.paths[0].symlink_to(outside)
    messages: list[str] = []
    trt_build.ensure_engines(onnx_export, tmp_path / "engines", log=messages.append)
    assert built[-1] == "layer_00.onnx" and "outside the engine directory" in messages[0]
    assert not engines.paths[0].is_symlink()


def test_engines_are_never_built_from_an_export_whose_layers_were_swapped(stub_trt, onnx_export, tmp_path):
    import json
    import shutil

    from kvzap_eval.errors import ArtifactError

    directory = shutil.copytree(onnx_export, tmp_path / "swapped")
    manifest = json.loads((directory / "manifest.json").read_text())
    first, second = manifest["layers"]
    (first["file"], first["sha256"]), (second["file"], second["sha256"]) = (
        (second["file"], second["sha256"]),
        (first["file"], first["sha256"]),
    )
    (directory / "manifest.json").write_text(json.dumps(manifest))
    _, built = stub_trt
    with pytest.raises(ArtifactError, match=r"layer 0 file .*layer_01.onnx' was exported as layer 1, not layer 0"):
        trt_build.ensure_engines(directory, tmp_path / "engines")
    assert built == []


def test_an_onnx_file_changed_between_its_check_and_the_build_is_refused(stub_trt, onnx_export, tmp_path):
    from exporters.manifest import read_manifest
    from kvzap_eval.errors import ArtifactError

    path = onnx_export / "layer_00.onnx"
    assert trt_build.read_onnx(path, read_manifest(onnx_export).layers[0].sha256, 0) == path.read_bytes()
    with pytest.raises(ArtifactError, match=r"layer 0 file .*layer_00.onnx' changed after it was checked"):
        trt_build.read_onnx(path, "0" * 64, 0)


def test_an_engine_directory_that_is_a_file_is_one_line(stub_trt, onnx_export, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"engine directory '.*file' is a file, not a directory"):
        trt_build.ensure_engines(onnx_export, tmp_path / "file")
