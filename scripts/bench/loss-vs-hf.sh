#!/usr/bin/env bash
# Issue 7's loss check on real text, on one GPU: from the same random init and on the same token
# windows (shards of the embedded corpus), flexcp with the ffa backend, flexcp with the torch backend
# and HF transformers train for STEPS steps; `flexcp compare` then measures the agreement (mean and
# max |delta loss| over the last 100 steps, HF as the baseline) and draws the curves.
#
#   scripts/bench/loss-vs-hf.sh [--steps 300] [--out DIR] [-- --set key=value ...]
#
# Needs build-gpu/ (scripts/gpu-build.sh) and data/nlp-corpus (scripts/demo.sh prepares it).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=${FLEXCP_BIN:-$root/build-gpu/app/flexcp}
steps=300 out=runs/loss-vs-hf extra=()
while [ $# -gt 0 ]; do
  case $1 in
    --steps) steps=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "loss-vs-hf.sh: unknown argument '$1' (see the header of $0)" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
python3 "$root/scripts/bench/hf_loss_run.py" init --out "$out/init"
sets=(--set model.from="$out/init" --set train.steps="$steps" --set train.global_batch=1 --set train.micro_batch=1
      --set checkpoint.every=0 --set checkpoint.at_end=false "${extra[@]}")
cfg=$root/configs/llama3.2-1b.yaml
"$bin" train "$cfg" "${sets[@]}" --dry-run >"$out/resolved.yaml"
"$bin" batches "$cfg" "${sets[@]}" --out "$out/windows.npy"
for backend in ffa torch; do
  "$bin" train "$cfg" "${sets[@]}" --set parallel.attention=$backend --set logging.dir="$out/flexcp-$backend" --quiet
  tail -n 1 "$out/flexcp-$backend/metrics.jsonl"
done
python3 "$root/scripts/bench/hf_loss_run.py" train --init "$out/init" --config "$out/resolved.yaml" \
  --windows "$out/windows.npy" --out "$out/hf"
"$bin" compare "$out/hf" "$out/flexcp-ffa" "$out/flexcp-torch" --last 100 \
  --out "$out/loss-vs-hf.png" --json "$out/compare.json"
