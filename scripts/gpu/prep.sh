#!/usr/bin/env bash
# Lent-GPU run, call 1 of 2. Carries .gpu/c1 (made by scripts/gpu/pack.sh). Unpacks the Python packages the device
# image lacks into /tmp/site and keeps the first part of the embedded GGUF in /tmp/kvz for call 2
# (scripts/gpu/curves.sh, on the same warm machine), then tries CUDA MPS (several processes' kernels on the GPU at
# once instead of time-sliced): it stays on for call 2 only if two processes could use the GPU through it.
set -uo pipefail
cd "$(dirname "$0")/../.."
start=$SECONDS
mkdir -p /tmp/site /tmp/kvz
tar -xJf .gpu/c1/site.tar.xz -C /tmp/site && cp .gpu/c1/gguf.xz.part1 /tmp/kvz/ || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 - <<'PY'
import importlib

for name in ("torch", "transformers", "lm_eval", "datasets", "tokenizers", "huggingface_hub", "onnxruntime"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # noqa: BLE001 - a report of what is there
        print(name, "FAILED:", error)
PY
probe='import torch; x = torch.ones(1024, device="cuda"); torch.cuda.synchronize(); print(float(x.sum()))'
if command -v nvidia-cuda-mps-control > /dev/null; then
  nvidia-cuda-mps-control -d && sleep 1
  if timeout 60 python3 -c "$probe" && timeout 60 python3 -c "$probe"; then
    echo on > /tmp/kvz/mps
    echo "MPS: on"
  else
    echo quit | nvidia-cuda-mps-control
    echo "MPS: failed, off"
  fi
else
  echo "MPS: nvidia-cuda-mps-control not found, off"
fi
echo "prep done in $((SECONDS - start)) s"
