"""`kvzap-eval sweep` on CUDA: every sweep method runs on the GPU and agrees with the same sweep on the CPU.

The tiny random model decodes greedily, so the full cache must give the same answers on both devices; the methods
prune by scores computed in float32 on either device, so their achieved compression must agree closely (the random
baseline draws from a per-device generator: only its ratio, which it is set to, is compared).
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICES = tuple(os.environ.get("KVZAP_SWEEP_DEVICES", "cpu,cuda").split(","))  # cpu,cpu checks the test itself

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif("cuda" in DEVICES and not torch.cuda.is_available(), reason="no CUDA device visible to torch"),
]


def test_every_sweep_method_runs_on_cuda_as_on_cpu(tiny, tmp_path):
    pytest.importorskip("lm_eval")
    from kvzap_eval.evaluation.sweep import SWEEP_METHODS, run_sweep

    from ..lmeval_helpers import sweep_config

    # the tiny sweep gives one (MLP) surrogate=, which kvzap_linear refuses (it would be an MLP run labelled linear)
    methods = [method for method in SWEEP_METHODS if method != "kvzap_linear"]
    tables = []
    for index, device in enumerate(DEVICES):
        config = sweep_config(tiny, tmp_path / f"{index}-{device}.jsonl", methods=methods, device=device)
        tables.append({row["key"]: row for row in run_sweep(config)})
    cpu, gpu = tables
    assert set(cpu) == set(gpu)
    assert {row["method"] for row in gpu.values()} == set(methods)
    for key, reference in cpu.items():
        row = gpu[key]
        assert row["n"] == reference["n"] == 3, key
        if reference["method"] == "full":
            assert row["accuracy"] == reference["accuracy"]
            assert row["compression_ratio"] == 0.0
        elif reference["method"] == "random":
            assert row["compression_ratio"] == pytest.approx(reference["compression_ratio"], abs=0.1), key
        else:
            assert row["compression_ratio"] == pytest.approx(reference["compression_ratio"], abs=0.02), key
            assert 0.0 < row["compression_ratio"] < 1.0, key
