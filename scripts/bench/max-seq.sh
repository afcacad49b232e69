#!/usr/bin/env bash
# Issue 7, memory: which sequence lengths train on this GPU, with and without activation
# checkpointing (Llama-3.2-1B, micro-batch 1, bf16 + fp32 master weights and AdamW state, ffa).
# Each length runs 2 optimizer steps on synthetic tokens; prints fits / out of memory, the peak
# memory and tokens/s of the second step.
#
#   scripts/bench/max-seq.sh ["16384 32768"] ["65536 131072"] [-- --set key=value ...]
#     first list: lengths tried without checkpointing; second: with checkpointing
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=${FLEXCP_BIN:-$root/build-gpu/app/flexcp}
plain=${1:-"16384 24576 32768"} ckpt=${2:-"65536 98304 131072"}
shift $(( $# >= 2 ? 2 : $# )); [ "${1:-}" = "--" ] && shift
tmp=$(mktemp -d)
try() {  # try SEQ CHECKPOINTING [--set ...]
  local seq=$1 ac=$2; shift 2
  local dir=$tmp/s$seq-$ac
  if "$bin" train "$root/configs/llama3.2-1b.yaml" --set data.synthetic=true --set train.global_batch=1 \
      --set train.seq_len="$seq" --set train.steps=2 --set train.activation_checkpointing="$ac" \
      --set checkpoint.every=0 --set checkpoint.at_end=false --set logging.dir="$dir" --quiet "$@" >"$dir.log" 2>&1; then
    python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])][-1]; print(f'seq {sys.argv[2]:>7} checkpointing {sys.argv[3]:5}: fits, peak {r[\"peak_mem_gib\"]:.1f} GiB, {r[\"tokens_per_s\"]:.0f} tokens/s')" \
      "$dir/metrics.jsonl" "$seq" "$ac"
  else
    echo "seq $(printf %7s "$seq") checkpointing $(printf %-5s "$ac"): does not fit ($(grep -m1 -io 'out of memory[^|]*' "$dir.log" | head -c 120 || tail -n 1 "$dir.log"))"
  fi
}
for s in $plain; do try "$s" false "$@"; done
for s in $ckpt; do try "$s" true "$@"; done
