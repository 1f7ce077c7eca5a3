#!/usr/bin/env bash
# Packs what the two lent-GPU calls carry into .gpu/ (git-ignored). One call carries at most 64 MiB, the working tree
# (~14 MB) included, and the bare device image has torch and onnxruntime but no lm-eval, so:
#   .gpu/c1 (call 1, scripts/gpu/prep.sh): the Python packages the image lacks (lm-eval and its needs, and this
#           project's transformers pin), unpacked from their wheels into one xz tarball without lm-eval's own task
#           folders (the sweeps use tasks/ only), and the first part of the xz-compressed embedded GGUF;
#   .gpu/c2 (call 2, scripts/gpu/curves.sh): the GGUF's second part and checksum, and the first shipped SmolLM2 MLP
#           surrogate (git 1672a15) for the old-vs-new comparison.
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}
grep -qsx '/.gpu/' .git/info/exclude || { mkdir -p .git/info && echo '/.gpu/' >> .git/info/exclude; }
rm -rf .gpu && mkdir -p .gpu/whl .gpu/site .gpu/c1 .gpu/c2
pick="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl"
# shellcheck disable=SC2086
"$python" -m pip download -q $pick lm_eval==0.4.13 datasets==5.2.0 transformers==5.24.0 evaluate==0.4.6 dill==0.4.1 \
  multiprocess==0.70.19 more_itertools pytablewriter==1.2.1 DataProperty mbstrdecoder pathvalidate tabledata tcolorpy \
  typepy chardet pytz nltk gguf==0.19.0
"$python" -m pip wheel -q --no-deps -w .gpu/whl rouge-score==0.1.2 sqlitedict==2.1.0 word2number==1.1
for wheel in .gpu/whl/*.whl; do unzip -q -o "$wheel" -d .gpu/site; done
find .gpu/site/lm_eval/tasks -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
tar -cJf .gpu/c1/site.tar.xz -C .gpu/site . && rm -rf .gpu/whl .gpu/site
gguf=$("$python" -c "from kvzap_eval.llm.embedded import embedded_gguf_path; print(embedded_gguf_path())")
xz -T2 -6 -c "$gguf" > .gpu/gguf.xz
head -c 44000000 .gpu/gguf.xz > .gpu/c1/gguf.xz.part1
tail -c +44000001 .gpu/gguf.xz > .gpu/c2/gguf.xz.part2 && rm .gpu/gguf.xz
sha256sum < "$gguf" > .gpu/c2/gguf.sha256
old=.gpu/c2/old/KVzap-mlp-SmolLM2-135M-Instruct && mkdir -p "$old"
for f in config.json model.safetensors training_report.json; do
  git show "1672a15:kvzap_eval/surrogates/KVzap-mlp-SmolLM2-135M-Instruct/$f" > "$old/$f"
done
tree=$(git ls-files -z | xargs -0 stat -c %s | paste -sd+ | bc)
for call in c1 c2; do
  echo "$call: $(( (tree + $(du -sb .gpu/$call | cut -f1)) / 1048576 )) MiB with the working tree (limit 64)"
done
