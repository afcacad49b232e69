#!/usr/bin/env bash
# End-to-end smoke checks of a GPU build (run on the GPU machine from the repository root, after
# `eval "$(bash scripts/gpu-build.sh)"`). Each check prints "== NAME ok" or "== NAME FAILED":
#   train-bf16-ffa   tiny Llama (head_dim 64: the FFA kernels take 64 or 128), bf16 + fp32 master, our FFA kernels, real shards; loss must fall
#   train-bf16-torch the same with the torch (SDPA) backend; the two loss curves are compared
#   comm-check       the NCCL communicator on this GPU
#   train-cp1-nccl   the CP trainer path with the NCCL communicator (cp = 1, one GPU)
#   export-hf        `flexcp export` of the ffa run's checkpoint loads in HF transformers as
#                    LlamaForCausalLM with no missing/unexpected tensors and gives flexcp's logits
# Usage: scripts/gpu-smoke.sh [OUT_DIR]     (exit status = number of failed checks)
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${1:-/tmp/flexcp-smoke}
rm -rf "$out" && mkdir -p "$out"
bin=./build-gpu/app/flexcp
failed=0
check() {  # check NAME COMMAND...
  local name=$1; shift
  if "$@" >"$out/$name.log" 2>&1; then echo "== $name ok"; else echo "== $name FAILED"; tail -n 15 "$out/$name.log"; failed=$((failed + 1)); fi
}
data=${FLEXCP_SMOKE_DATA:-data/nlp-corpus}
common=(--set train.device=cuda --set train.dtype=bf16 --set model.head_dim=64 --set data.path="$data" --set train.steps=60
        --set train.warmup=10 --quiet)
check train-bf16-ffa "$bin" train configs/tiny.yaml "${common[@]}" --set parallel.attention=ffa \
  --set logging.dir="$out/ffa" --set checkpoint.dir="$out/ffa/checkpoints" --set checkpoint.every=60
check train-bf16-torch "$bin" train configs/tiny.yaml "${common[@]}" --set parallel.attention=torch \
  --set logging.dir="$out/torch" --set checkpoint.every=0
check loss-falls python3 - "$out/ffa/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / 5
print(f"first {first:.3f} last5 {last:.3f}")
sys.exit(0 if last < first - 1.0 else 1)
PY
# The gate catches a broken attention (a causal leak or wrong gradients move the curve by tenths), not
# the chaos of 60 bf16 steps: between exact backends the mean |delta loss| over steps 20-60 measured
# 0.005-0.055 over three seeds (session 11, H100: forward kernels 0 and 5 against torch), so 0.1.
check compare-ffa-torch "$bin" compare "$out/ffa" --baseline "$out/torch" --max-mean-delta 0.1 --window 20:
check comm-check "$bin" comm-check --device cuda --communicator nccl
check train-cp1-nccl "$bin" train configs/tiny-cp1.yaml --set train.device=cuda --set data.synthetic=true \
  --set train.steps=20 --set parallel.communicator=nccl --set logging.dir="$out/cp1" --set checkpoint.every=0 --quiet
ckpt=$(ls -d "$out"/ffa/checkpoints/step_* 2>/dev/null | tail -n 1)
check export-hf bash -c "'$bin' export '$ckpt' --out '$out/export' && python3 - '$out/export' <<'PY'
import sys, torch
from transformers import LlamaForCausalLM
m, info = LlamaForCausalLM.from_pretrained(sys.argv[1], output_loading_info=True, torch_dtype=torch.float32)
bad = {k: v for k, v in info.items() if v}
print('loading info', info)
ids = torch.randint(0, m.config.vocab_size, (1, 64))
print('logits', m(ids).logits.shape, 'finite', bool(torch.isfinite(m(ids).logits).all()))
sys.exit(1 if bad else 0)
PY"
if [ -x ./build-gpu/test/flexcp_tests ]; then
  check export-hf-logits bash -c "FLEXCP_HF_EXPORT_DIR='$out/hf-export' ./build-gpu/test/flexcp_tests '[.hf-export]' &&
    python3 test/fixtures/check_hf_export.py '$out/hf-export' test/fixtures/llama"
fi
echo "== smoke: $failed failed"
exit $failed
