#!/usr/bin/env bash
# Packs what the two lent-GPU calls carry into .gpu/ (git-ignored via .git/info/exclude): the wheels the device
# image lacks (lm-eval and its needs; it has torch, transformers, onnxruntime), the embedded GGUF in two parts
# (each call carries at most 64 MiB) with its checksum, and the tokenizer of the embedded model for tests/gpu.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/whl .gpu/p1 .gpu/p2
pick="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl"
# shellcheck disable=SC2086
python3 -m pip download -q $pick lm_eval==0.4.13 datasets==5.0.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 \
  more_itertools pytablewriter==1.2.1 DataProperty mbstrdecoder pathvalidate tabledata tcolorpy typepy chardet pytz \
  nltk gguf==0.19.0
python3 -m pip wheel -q --no-deps -w .gpu/whl rouge-score==0.1.2 sqlitedict==2.1.0 word2number==1.1
gguf=$(python3 -c "from kvzap_eval.llm.embedded import embedded_gguf_path; print(embedded_gguf_path())")
head -c 42000000 "$gguf" > .gpu/p1/gguf.part1
tail -c +42000001 "$gguf" > .gpu/p2/gguf.part2
sha256sum "$gguf" > .gpu/p2/gguf.sha256
model=$(python3 -c "from kvzap_eval.llm.embedded import embedded_model_dir; print(embedded_model_dir())")
mkdir -p .gpu/tok/tokcache/SmolLM2-135M-Instruct
cp "$model"/{.kvzap-eval-complete,*.json,*.jinja} .gpu/tok/tokcache/SmolLM2-135M-Instruct/
tar -czf .gpu/p1/tokcache.tgz -C .gpu/tok tokcache && rm -rf .gpu/tok
du -sh .gpu/*
