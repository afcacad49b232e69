#!/usr/bin/env bash
# Issue 8 on one 8-GPU host (run from the repository root after `eval "$(bash scripts/gpu-build.sh)"`):
#   1. `flexcp bench cp-attn` on cp = 2, 4, 8 GPUs: out, lse, dq, dk, dv of CP attention (ffa, bf16)
#      against the single-GPU ffa result, causal and document masks, S = 8192 and 65,536; timings,
#      bytes moved and the fraction of communication hidden behind compute.
#   3. Scaling: `flexcp train` of configs/llama3.2-1b-cp{1,2,4,8}.yaml on cp GPUs (dp = 1, one
#      8192-token sequence per step, synthetic tokens), tokens/s per GPU from metrics.jsonl; then
#      cp = 8 at 65,536 and 131,072 tokens with activation checkpointing.
# Results: every run's JSON / metrics under OUT_DIR, a summary in docs/bench/multi-gpu-h100.json.
# NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and friends, passed to every rank with -x).
# Usage: scripts/bench/multi-gpu.sh [OUT_DIR]   (exit status = number of failed runs)
#   STEPS=8 ITERS=10 FP32REF=1 BIN=./build-gpu/app/flexcp MPIRUN=mpirun scripts/bench/multi-gpu.sh
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
out=${1:-/tmp/flexcp-multi-gpu}
bin=${BIN:-./build-gpu/app/flexcp}
mpirun_bin=${MPIRUN:-mpirun}
steps=${STEPS:-8}    # optimizer steps per training run; the first 2 are warm-up, not counted
iters=${ITERS:-10}   # timed calls per bench measurement
summary=docs/bench/multi-gpu-h100.json
rm -rf "$out" && mkdir -p "$out"

export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mpi() {  # mpi NP ARGS...: flexcp on NP ranks, one per GPU
  local np=$1; shift
  "$mpirun_bin" -np "$np" --allow-run-as-root --bind-to none \
    -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x NVSHMEM_DISABLE_NVLS -x LD_LIBRARY_PATH \
    "$bin" "$@"
}
failed=0
check() {  # check NAME COMMAND...
  local name=$1; shift
  echo "== $name: $*"
  if "$@" >"$out/$name.log" 2>&1; then echo "== $name ok"; else echo "== $name FAILED"; failed=$((failed + 1)); fi
  tail -n 14 "$out/$name.log"
}

# 1. CP attention against the single GPU.
for cp in 2 4 8; do
  for seq in 8192 65536; do
    for mask in causal docs; do
      name=cp-attn-cp$cp-s$seq-$mask
      check "$name" mpi "$cp" bench cp-attn --device cuda --backend ffa --dtype bf16 --seq "$seq" --mask "$mask" \
        --docs 8 --heads-q 32 --heads-kv 8 --head-dim 64 --iters "$iters" --json "$out/$name.json"
    done
  done
done

# The bf16 tolerance above is the documented 2e-2; this one derives it from the single-GPU error
# against the exact fp32 reference kernel (~8 GiB of fp32 scores per tensor at S = 8192: may not fit;
# FP32REF=0 skips it).
if [ "${FP32REF:-1}" = 1 ]; then
  check cp-attn-cp8-s8192-causal-fp32ref mpi 8 bench cp-attn --device cuda --backend ffa --dtype bf16 --seq 8192 \
    --mask causal --iters 0 --fp32-ref --json "$out/cp-attn-cp8-s8192-causal-fp32ref.json"
fi

# 3. Training throughput per GPU.
train_run() {  # train_run NAME NP CONFIG [--set ...]
  local name=$1 np=$2 config=$3; shift 3
  check "$name" mpi "$np" train "$config" --quiet \
    --set data.synthetic=true --set train.steps="$steps" --set train.warmup=0 --set train.global_batch=1 \
    --set train.micro_batch=1 --set checkpoint.every=0 --set checkpoint.at_end=false \
    --set logging.dir="$out/$name" "$@"
}
for cp in 1 2 4 8; do
  train_run "train-cp$cp-s8192" "$cp" "configs/llama3.2-1b-cp$cp.yaml"
done
for seq in 65536 131072; do
  train_run "train-cp8-s$seq" 8 configs/llama3.2-1b-cp8.yaml --set train.seq_len="$seq" \
    --set train.activation_checkpointing=true
done

# Summary: bench JSONs as they are, and per training run the median step of steps 3.. (tokens/s over
# all GPUs, divided by the GPUs of the run for tokens/s per GPU).
python3 - "$out" "$summary" <<'EOF'
import glob, json, os, statistics, subprocess, sys
out, summary = sys.argv[1], sys.argv[2]
try:
    gpus = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip().splitlines()
except OSError:
    gpus = []
res = {"issue": 8, "gpu": gpus[0] if gpus else "unknown", "gpus": len(gpus),
       "scaling_note": "training runs use cp GPUs each (dp = 1, global_batch 1); tokens/s per GPU = tokens/s / cp",
       "cp_attention": [], "training": []}
for f in sorted(glob.glob(os.path.join(out, "cp-attn-*.json"))):
    with open(f) as fh:
        res["cp_attention"].append(json.load(fh))
for d in sorted(glob.glob(os.path.join(out, "train-cp*"))):
    m = os.path.join(d, "metrics.jsonl")
    if not os.path.isdir(d) or not os.path.exists(m):
        continue
    name = os.path.basename(d)
    cp = int(name.split("-")[1][2:])
    seq = int(name.split("-")[2][1:])
    with open(m) as fh:
        rows = [json.loads(l) for l in fh if l.strip()]
    timed = [r for r in rows if r.get("step", 0) > 2] or rows
    tps = statistics.median(r["tokens_per_s"] for r in timed)
    res["training"].append({"run": name, "cp": cp, "gpus": cp, "seq": seq, "steps": len(rows),
                            "step_ms": statistics.median(r["step_ms"] for r in timed),
                            "tokens_per_s": tps, "tokens_per_s_per_gpu": tps / cp,
                            "peak_mem_gib": max(r.get("peak_mem_gib", 0) for r in timed),
                            "mfu": statistics.median(r.get("mfu", 0) for r in timed)})
tmp = summary + ".tmp"
with open(tmp, "w") as fh:
    json.dump(res, fh, indent=1)
    fh.write("\n")
    fh.flush()
    os.fsync(fh.fileno())
os.replace(tmp, summary)
print("wrote", summary)
for t in res["training"]:
    print("{run}: {tokens_per_s_per_gpu:.0f} tokens/s per GPU, step {step_ms:.1f} ms, {peak_mem_gib:.1f} GiB".format(**t))
EOF
echo "== $failed failed"
exit "$failed"
