"""`kvzap-eval latency` on a tiny surrogate: every backend timed beside the kvpress-style call, report files written."""

from __future__ import annotations

import json

import pytest
import torch

from kvzap_eval.cli import SUBCOMMANDS
from kvzap_eval.surrogate import KVzapSurrogate, SurrogateConfig
from kvzap_eval.tools.latency import (
    REFERENCE,
    Case,
    load_report,
    render_markdown,
    run_latency,
    write_report,
)


def test_latency_report_times_each_backend_next_to_the_kvpress_style_call(tmp_path, monkeypatch):
    monkeypatch.setenv("KVZAP_EVAL_CACHE", str(tmp_path / "cache"))
    case = Case("Tiny mlp (D=64)", KVzapSurrogate(SurrogateConfig(64, 2, 3, 8)).eval(), "random weights")
    report = run_latency([case], threads=[1], prefill=[32], min_run_time=0.03, rounds=1, layer_fraction=False)
    phases = {(r.phase, r.backend) for r in report.rows}
    backends = {REFERENCE, "torch"} | ({"onnxruntime", "onnxruntime int8"} if _has("onnxruntime") else set())
    for phase in ("decode, same layer", "decode, layers in turn", "prefill T=32"):
        assert {b for p, b in phases if p == phase} == backends
    assert all(r.seconds > 0 and r.ratio > 0 for r in report.rows)
    assert all(r.ratio == 1.0 for r in report.rows if r.backend == REFERENCE)

    if _has("onnxruntime"):
        assert any("onnxruntime int8 (int8 export)" in note and "agreement >=" in note for note in report.notes)
    paths = write_report(report, tmp_path / "out")
    markdown = (tmp_path / "out" / "latency.md").read_text()
    assert "| decode, same layer | 1 |" in markdown and "best / kvpress-style" in markdown
    assert json.loads((tmp_path / "out" / "latency.json").read_text())["rows"][0]["threads"] == 1
    if _has("matplotlib"):
        assert (tmp_path / "out" / "latency.png").stat().st_size > 1000 and len(paths) == 3
    assert render_markdown(report) == markdown
    assert render_markdown(load_report(tmp_path / "out" / "latency.json")) == markdown


def test_latency_is_a_cli_subcommand():
    assert SUBCOMMANDS["latency"] == "kvzap_eval.tools.latency"


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
