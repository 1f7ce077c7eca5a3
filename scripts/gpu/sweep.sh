#!/usr/bin/env bash
# Lent-GPU run, call 2 of 2 (README "Results on a GPU"): the accuracy-vs-compression sweep on SmolLM2, n = 50 per
# task and length at 1k and 2k, every method, one process per (task, length) group sharing the GPU.
# Needs call 1 (scripts/gpu/prep.sh) on the same warm machine. Carries: .gpu/p2.
# Usage: bash scripts/gpu/sweep.sh [seconds for the sweep, default 450]. Each shard runs its runs in order of
# importance and is stopped at the budget (finished rows are kept); the shards are merged into
# $OUT/smollm2-gpu.jsonl, logs and shard tables into $OUT/sweep-logs.tgz.
set -uo pipefail
cd "$(dirname "$0")/../.."
budget=${1:-450}
device=${KVZ_DEVICE:-cuda} limit=${KVZ_LIMIT:-50} run=${KVZ_RUN_SHARDS:-18}  # overrides for a dry run on a CPU
start=$SECONDS
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
export KVZAP_EVAL_CACHE=/tmp/kvz/cache
gguf=/tmp/kvz/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$KVZAP_EVAL_CACHE/SmolLM2-135M-Instruct/.kvzap-eval-complete" ]; then  # a rerun resumes: convert once
  cat /tmp/kvz/gguf.part1 .gpu/p2/gguf.part2 > "$gguf" || exit 1
  [ "$(sha256sum < "$gguf" | cut -d' ' -f1)" = "$(cut -d' ' -f1 .gpu/p2/gguf.sha256)" ] || { echo "GGUF damaged"; exit 1; }
  python3 -c "from pathlib import Path; from kvzap_eval.llm.embedded import _convert
_convert(Path('$gguf'), Path('$KVZAP_EVAL_CACHE/SmolLM2-135M-Instruct'))" || exit 1
fi
echo "model ready after $((SECONDS - start)) s"
tasks="kvzap_niah_single_repeat kvzap_niah_single_essay kvzap_niah_multikey kvzap_niah_multivalue
  kvzap_niah_multiquery kvzap_vt kvzap_cwe kvzap_kv kvzap_qa"
tables=/tmp/kvz/tables
mkdir -p "$tables"
n=18  # 9 tasks x 2 lengths: one (task, length) group per shard
tick=0
left=$((budget - (SECONDS - start)))
dmon=
if command -v nvidia-smi > /dev/null; then nvidia-smi dmon -s um -d 15 > "$tables/dmon.log" 2>&1 & dmon=$!; fi
pids=()
for i in $(seq 0 $((run - 1))); do
  timeout -k 10 -s INT "$left" bash -c '
    sweep() { python3 -m kvzap_eval sweep --output "$0/shard$1.jsonl" --shard "$1/$2" --tasks $3 --lengths 1024 2048 \
      --limit $4 --device $5 --batch-size 8 "${@:6}"; }
    sweep "$@" --methods full kvzap_mlp random streaming --thresholds -2.5;
    sweep "$@" --methods kvzap_mlp kvzip_plus_threshold --thresholds -2.5;
    sweep "$@" --methods kvzap_mlp kvzap_linear kvzip_plus kvzap_adakv snapkv --thresholds -2.5;
    sweep "$@" --methods kvzap_mlp random streaming --thresholds -3.0' "$tables" "$i" "$n" "$tasks" "$limit" "$device" \
    > "$tables/shard$i.log" 2>&1 &
  pids+=($!)
done
alive() { for pid in "${pids[@]}"; do kill -0 "$pid" 2> /dev/null && return 0; done; return 1; }
while alive; do
  sleep 5; ((++tick % 6)) && continue
  echo "$((SECONDS - start)) s: $(cat "$tables"/shard*.jsonl 2>/dev/null | wc -l) runs done"
done
[ -n "$dmon" ] && kill "$dmon"
python3 -m kvzap_eval merge --output "$OUT/smollm2-gpu.jsonl" "$tables"/shard*.jsonl
tar -czf "$OUT/sweep-logs.tgz" -C "$tables" .
echo "sweep done in $((SECONDS - start)) s"
