#!/usr/bin/env bash
# A/B of the gradient all-reduce overlapped with the backward (core/grad_reducer.h) on NGPU GPUs: flexcp
# train of Llama-3.2-1B, 8192 tokens per sequence, synthetic tokens, as dp = NGPU (one sequence per GPU)
# and as cp = NGPU (one sequence over all GPUs), each with FLEXCP_GRAD_OVERLAP=1 and =0. Prints the median
# step time of the steps after the first two, the profiled step's "all-reduce" and "backward" phases, the
# buckets that went out during the backward, and whether the two runs' losses are bit-identical.
#   BIN=./build-gpu/app/flexcp NGPU=2 STEPS=8 scripts/bench/grad_overlap_ab.sh [OUT_DIR]
set -uo pipefail
out=${1:-/tmp/flexcp-grad-overlap}
bin=${BIN:-./build-gpu/app/flexcp}
ngpu=${NGPU:-2}
steps=${STEPS:-8}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
for layout in dp cp; do
  if [ "$layout" = dp ]; then cfg=(configs/llama3.2-1b-cp1.yaml --set train.global_batch="$ngpu");
  else cfg=(configs/llama3.2-1b-cp2.yaml --set parallel.cp="$ngpu" --set train.global_batch=1); fi
  for ov in 1 0; do
    name=$layout$ngpu-overlap$ov
    FLEXCP_GRAD_OVERLAP=$ov mpirun -np "$ngpu" --allow-run-as-root --bind-to none -x FLEXCP_GRAD_OVERLAP \
      -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x NVSHMEM_DISABLE_NVLS -x LD_LIBRARY_PATH \
      "$bin" train "${cfg[@]}" --quiet --set data.synthetic=true --set train.steps="$steps" --set train.warmup=0 \
      --set train.micro_batch=1 --set train.val_every=0 --set checkpoint.every=0 --set checkpoint.at_end=false \
      --set logging.dir="$out/$name" --profile-step $((steps - 1)) >"$out/$name.log" 2>&1 \
      || { echo "== $name FAILED"; tail -n 15 "$out/$name.log"; }
  done
done
python3 - "$out" "$ngpu" <<'PY'
import json, os, statistics, sys
out, ngpu = sys.argv[1], sys.argv[2]
def load(name):
    path = os.path.join(out, name, "metrics.jsonl")
    return [json.loads(l) for l in open(path)] if os.path.exists(path) else []
for layout in ("dp", "cp"):
    runs = {ov: load(f"{layout}{ngpu}-overlap{ov}") for ov in (1, 0)}
    for ov, recs in runs.items():
        if not recs:
            print(f"{layout}{ngpu} overlap={ov}: no metrics"); continue
        ms = statistics.median(r["step_ms"] for r in recs[2:]) if len(recs) > 2 else float("nan")
        prof = next((dict(r["profile_ms"]) for r in recs if "profile_ms" in r), {})
        print(f"{layout}{ngpu} overlap={ov}: step {ms:.1f} ms, tokens/s/GPU {8192 * (int(ngpu) if layout == 'dp' else 1) / ms * 1e3 / int(ngpu):.0f}, "
              f"backward {prof.get('backward', float('nan')):.1f} ms, all-reduce {prof.get('all-reduce', float('nan')):.1f} ms, "
              f"buckets in backward {recs[-1].get('grad_buckets_in_backward', '-')}")
    if runs[1] and runs[0]:
        same = [a["loss"] == b["loss"] for a, b in zip(runs[1], runs[0])]
        print(f"{layout}{ngpu}: losses bit-identical on {sum(same)} of {len(same)} steps; "
              f"max |diff| {max(abs(a['loss'] - b['loss']) for a, b in zip(runs[1], runs[0])):.3g}")
PY
