#!/usr/bin/env bash
# Lent-GPU run, call 2 of 2 (after scripts/gpu/prep.sh on the same warm machine). Carries .gpu/c2.
# Rebuilds the embedded GGUF from its two carried parts and converts it, runs the GPU tests and the GPU latency table
# beside the sweep, and the accuracy-curve sweep itself (scripts/gpu/curves.py: n = 100 per task and point, 1k and 2k,
# most important units first) until the budget. Returns in $OUT: curves-gpu.jsonl, old-2k-gpu.jsonl, gpu-tests.log,
# attention-layouts.log, latency-gpu.tgz and sweep-logs.tgz (the side jobs run beside the sweep: at batch 16 its 14
# workers leave them about 30 GiB).
# Usage: bash scripts/gpu/curves.sh [seconds for the sweep, default 450] [workers, default 14]
# (2026-12-04 on one H200: prep 30 s, model ready after 60 s; 14 workers at batch 34 ran it out of memory, see
# curves.py for the batch that fits.)
set -uo pipefail
cd "$(dirname "$0")/../.."
budget=${1:-450} workers=${2:-14}
start=$SECONDS
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
export KVZAP_EVAL_CACHE=/tmp/kvz/cache PYTHONUNBUFFERED=1
gguf=/tmp/kvz/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$KVZAP_EVAL_CACHE/SmolLM2-135M-Instruct/.kvzap-eval-complete" ]; then  # a rerun resumes: convert once
  cat /tmp/kvz/gguf.xz.part1 .gpu/c2/gguf.xz.part2 | xz -d > "$gguf" || exit 1
  [ "$(sha256sum < "$gguf")" = "$(cat .gpu/c2/gguf.sha256)" ] || { echo "GGUF damaged"; exit 1; }
  python3 -c "from pathlib import Path; from kvzap_eval.llm.embedded import _convert
_convert(Path('$gguf'), Path('$KVZAP_EVAL_CACHE/SmolLM2-135M-Instruct'))" || exit 1
fi
cp -r .gpu/c2/old /tmp/kvz/ 2>/dev/null
echo "model ready after $((SECONDS - start)) s; MPS: $(cat /tmp/kvz/mps 2>/dev/null || echo off)"
nvidia-smi dmon -s um -d 15 > /tmp/kvz/dmon.log 2>&1 &
dmon=$!
(
  timeout -k 5 60 python3 scripts/attention_layouts.py --device cuda > "$OUT/attention-layouts.log" 2>&1
  timeout -k 5 150 python3 -m pytest -m gpu tests/gpu -q -rs -p no:cacheprovider > "$OUT/gpu-tests.log" 2>&1
  echo "exit $?" >> "$OUT/gpu-tests.log"
  timeout -k 5 120 python3 -m kvzap_eval.cli latency --device cuda --threads 1 --no-layer-fraction --min-run-time 0.2 \
    --surrogates smollm2-mlp smollm2-linear qwen3-8b-mlp --out /tmp/kvz/latency-gpu > /tmp/kvz/latency.log 2>&1
  echo "exit $?" >> /tmp/kvz/latency.log
) &
side=$!
python3 scripts/gpu/curves.py --tables /tmp/kvz/tables --out "$OUT" --budget "$budget" --workers "$workers" \
  --old-surrogate /tmp/kvz/old/KVzap-mlp-SmolLM2-135M-Instruct
wait $side
kill $dmon 2>/dev/null
cp /tmp/kvz/dmon.log /tmp/kvz/latency.log /tmp/kvz/tables/ 2>/dev/null
tar -czf "$OUT/latency-gpu.tgz" -C /tmp/kvz latency-gpu 2>/dev/null
tar -czf "$OUT/sweep-logs.tgz" -C /tmp/kvz/tables --exclude claims .
echo "call 2 done in $((SECONDS - start)) s"
