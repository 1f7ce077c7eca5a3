#!/usr/bin/env bash
# GPU check: run the GPU paths end to end (tests/gpu: CUDA-graph replay, onnxruntime CUDA EP and TensorRT where
# installed; each skips with its reason otherwise), then print the GPU scorer latency table.
# Usage: bash scripts/gpu_check.sh [extra `kvzap-eval latency` options]   (or: tox -e gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-python}" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch: this check needs a GPU and a CUDA build of torch"
print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}")
for name in ("onnxruntime", "tensorrt"):
    try:
        module = __import__(name)
        extra = f", providers {module.get_available_providers()}" if name == "onnxruntime" else ""
        print(f"{name} {module.__version__}{extra}")
    except ImportError:
        print(f"{name}: not installed (its GPU tests skip)")
PY
status=0  # a failing test still leaves the latency table to be measured; the script exits with the tests' status
"${PYTHON:-python}" -m pytest -m gpu tests/gpu -q -rsP -p no:cacheprovider || status=$?  # -P: two-GPU split report
"${PYTHON:-python}" -m kvzap_eval.cli latency --device cuda --threads 1 --no-layer-fraction --out reports/latency-gpu "$@"
exit $status
