#!/usr/bin/env bash
# Lent-GPU run, call 1 of 2 (README "Results on a GPU"). The device machine has torch and transformers but no
# internet: install the carried wheels (lm-eval and what it needs) into /tmp/site, keep the first part of the
# embedded GGUF in /tmp/kvz (the whole GGUF is over one call's 64 MiB), then run tests/gpu and the GPU latency
# table (scripts/gpu_check.sh) with the tokenizer-only embedded cache that the tiny test models need.
# Carries: .gpu/whl .gpu/p1 (made by scripts/gpu/pack.sh). Writes $OUT/gpu_check.log and $OUT/latency-gpu.tgz.
set -uo pipefail
cd "$(dirname "$0")/../.."
start=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
  || exit 1
mkdir -p /tmp/kvz && cp .gpu/p1/gguf.part1 /tmp/kvz/ && tar -xzf .gpu/p1/tokcache.tgz -C /tmp/kvz || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHON=python3 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export KVZAP_EVAL_CACHE=/tmp/kvz/tokcache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 - <<'PY'
import importlib

for name in ("torch", "transformers", "lm_eval", "datasets", "pyarrow", "huggingface_hub", "tokenizers", "onnxruntime"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # noqa: BLE001 - a report of what is there
        print(name, "FAILED:", error)
PY
timeout -k 5 170 bash scripts/gpu_check.sh --min-run-time 0.3 --surrogates smollm2-mlp smollm2-linear qwen3-8b-mlp \
  2>&1 | tee "$OUT/gpu_check.log"
tar -czf "$OUT/latency-gpu.tgz" reports/latency-gpu 2>/dev/null
echo "prep done in $((SECONDS - start)) s"
