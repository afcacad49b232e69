#!/usr/bin/env bash
# Issue 8 on one multi-GPU host (run from the repository root after `eval "$(bash scripts/gpu-build.sh)"`).
# Uses the GPUs it finds (NGPU, default: all): cp = 2, 4, 8 up to NGPU.
#   attn      `flexcp bench cp-attn` on cp GPUs: out, lse, dq, dk, dv of CP attention (ffa, bf16) against
#             the single-GPU ffa result, causal and document masks, S = 8192 and 65,536; timings, bytes
#             moved, fraction of communication hidden behind compute; at the largest cp also with the
#             tolerance derived from the exact fp32 reference (FP32REF=0 skips it).
#   watchdog  the NCCL collective watchdog: 2 ranks of a tiny CUDA run on NCCL, rank 1 hangs at step 3;
#             rank 0 must name it and the job end with exit 3 within timeout_s + 20 s.
#   seed      the seed experiment (docs/seed-experiment.md) for SEED_STEPS steps: Llama-3.2-1B, fixed
#             random init, data/nlp-corpus, seq 8192, global batch 8, on all NGPU GPUs: no-CP with the
#             torch backend, and cp = 1, 2, .. NGPU with ffa (dp = NGPU / cp); `flexcp compare` of all.
#   scaling   `flexcp train` of configs/llama3.2-1b-cp{1,2,4,8}.yaml on cp GPUs (dp = 1, one 8192-token
#             sequence per step, synthetic tokens), tokens/s per GPU from metrics.jsonl; then cp = NGPU
#             at 65,536 and 131,072 tokens with activation checkpointing (LONG_STEPS steps).
# Results: every run's JSON / log / metrics under OUT_DIR, a summary in $SUMMARY
# (default docs/bench/multi-gpu-h100.json). NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and
# friends, passed to every rank with -x).
# Usage: scripts/bench/multi-gpu.sh [OUT_DIR]   (exit status = number of failed runs)
#   PARTS=attn,watchdog,seed,scaling NGPU=8 STEPS=8 LONG_STEPS=4 SEED_STEPS=100 ITERS=10 FP32REF=1
#   BIN=./build-gpu/app/flexcp MPIRUN=mpirun SUMMARY=docs/bench/multi-gpu-h100.json scripts/bench/multi-gpu.sh
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
out=${1:-/tmp/flexcp-multi-gpu}
bin=${BIN:-./build-gpu/app/flexcp}
mpirun_bin=${MPIRUN:-mpirun}
parts=",${PARTS:-attn,watchdog,seed,scaling},"
ngpu=${NGPU:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')}
steps=${STEPS:-8}            # optimizer steps per scaling run; the first 2 are warm-up, not counted
long_steps=${LONG_STEPS:-4}  # the same for the 65K / 131K runs
seed_steps=${SEED_STEPS:-100}
iters=${ITERS:-10}           # timed calls per bench measurement
summary=${SUMMARY:-docs/bench/multi-gpu-h100.json}
mkdir -p "$out"
cps=()
for cp in 2 4 8; do [ "$cp" -le "$ngpu" ] && cps+=("$cp"); done
max_cp=1
[ ${#cps[@]} -gt 0 ] && max_cp=${cps[-1]}
echo "== $ngpu GPUs: cp ${cps[*]:-none}; parts $parts"
want() { [[ "$parts" == *",$1,"* ]]; }

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
  local t0=$SECONDS
  if "$@" >"$out/$name.log" 2>&1; then echo "== $name ok ($((SECONDS - t0)) s)"; else echo "== $name FAILED ($((SECONDS - t0)) s)"; failed=$((failed + 1)); fi
  tail -n 8 "$out/$name.log"
}

# 1. CP attention against the single GPU.
if want attn; then
  for cp in "${cps[@]}"; do
    for seq in 8192 65536; do
      for mask in causal docs; do
        name=cp-attn-cp$cp-s$seq-$mask
        check "$name" mpi "$cp" bench cp-attn --device cuda --backend ffa --dtype bf16 --seq "$seq" --mask "$mask" \
          --docs 8 --heads-q 32 --heads-kv 8 --head-dim 64 --iters "$iters" --json "$out/$name.json"
      done
    done
  done
  # The bf16 tolerance above is the documented 2e-2; this one derives it from the single-GPU error
  # against the exact fp32 reference kernel (~8 GiB of fp32 scores per tensor at S = 8192).
  if [ "${FP32REF:-1}" = 1 ] && [ "$max_cp" -gt 1 ]; then
    name=cp-attn-cp$max_cp-s8192-causal-fp32ref
    check "$name" mpi "$max_cp" bench cp-attn --device cuda --backend ffa --dtype bf16 --seq 8192 \
      --mask causal --iters 0 --fp32-ref --json "$out/$name.json"
  fi
fi

# 2. The NCCL watchdog names a hung rank (issue 9's fault, on real GPUs).
if want watchdog && [ "$ngpu" -ge 2 ]; then
  check nccl-watchdog bash -c '
    t0=$SECONDS
    FLEXCP_TEST_HANG_AT_STEP=1:3 timeout 120 "$0" -np 2 --allow-run-as-root --bind-to none -x FLEXCP_TEST_HANG_AT_STEP \
      -x NCCL_NVLS_ENABLE -x LD_LIBRARY_PATH "$1" train configs/tiny-cp1.yaml --set train.device=cuda \
      --set data.synthetic=true --set train.steps=10 --set parallel.cp=2 --set parallel.communicator=nccl \
      --set parallel.timeout_s=8 --set checkpoint.every=0 --set logging.dir="$2/nccl-watchdog" --quiet >"$2/nccl-watchdog.inner" 2>&1 &
    job=$!
    for _ in $(seq 45); do kill -0 $job 2>/dev/null || break; sleep 1; done
    if kill -0 $job 2>/dev/null; then  # still there long after the timeout: show where each rank waits
      for pid in $(pgrep -f "flexcp train configs/tiny-cp1.yaml" | grep -v "^$job\$"); do
        echo "-- pid $pid threads (name wchan):"
        for t in /proc/$pid/task/*; do echo "   $(cat $t/comm) $(cat $t/wchan 2>/dev/null)"; done
        command -v gdb >/dev/null && gdb -p $pid -batch -ex "thread apply all bt 12" 2>/dev/null | grep -E "^Thread|^#" | head -80
      done
    fi
    wait $job
    rc=$?; t=$((SECONDS - t0)); cat "$2/nccl-watchdog.inner"
    echo "exit $rc after $t s"
    [ $rc -eq 3 ] && [ $t -le 60 ] && grep -qE "rank 1 has not reached it" "$2/nccl-watchdog.inner"' \
    "$mpirun_bin" "$bin" "$out"
fi

train_common=(--quiet --set checkpoint.every=0 --set checkpoint.at_end=false)

# 3. The seed experiment: the same global batch on all GPUs, cp = 1 .. NGPU and a no-CP torch baseline.
if want seed; then
  seed_runs=()
  seed_run() {  # seed_run NAME CONFIG [--set ...]
    local name=$1 config=$2; shift 2
    check "$name" mpi "$ngpu" train "$config" "${train_common[@]}" --set train.steps="$seed_steps" \
      --set train.warmup=$((seed_steps / 10 + 1)) --set train.val_every=0 --set logging.dir="$out/$name" "$@"
    seed_runs+=("$out/$name")
  }
  seed_run seed-torch configs/llama3.2-1b.yaml --set parallel.attention=torch
  for cp in 1 "${cps[@]}"; do seed_run "seed-cp$cp" "configs/llama3.2-1b-cp$cp.yaml"; done
  check seed-compare "$bin" compare "${seed_runs[@]}" --baseline "$out/seed-torch" --ema 0 \
    --last $((seed_steps / 3)) --json "$out/seed-compare.json"
fi

# 4. Training throughput per GPU.
if want scaling; then
  train_run() {  # train_run NAME NP STEPS CONFIG [--set ...]
    local name=$1 np=$2 n=$3 config=$4; shift 4
    check "$name" mpi "$np" train "$config" "${train_common[@]}" \
      --set data.synthetic=true --set train.steps="$n" --set train.warmup=0 --set train.global_batch=1 \
      --set train.micro_batch=1 --set train.val_every=0 --set logging.dir="$out/$name" "$@"
  }
  for cp in 1 "${cps[@]}"; do
    train_run "train-cp$cp-s8192" "$cp" "$steps" "configs/llama3.2-1b-cp$cp.yaml"
  done
  if [ "$max_cp" -gt 1 ]; then
    for seq in 65536 131072; do
      train_run "train-cp$max_cp-s$seq" "$max_cp" "$long_steps" "configs/llama3.2-1b-cp$max_cp.yaml" \
        --set train.seq_len="$seq" --set train.activation_checkpointing=true
    done
  fi
fi

# Summary: bench JSONs as they are, the seed comparison, and per training run the median step of
# steps 3.. (tokens/s over all GPUs, divided by the GPUs of the run for tokens/s per GPU).
python3 - "$out" "$summary" "$ngpu" <<'PY'
import glob, json, os, statistics, subprocess, sys
out, summary, ngpu = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    gpus = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip().splitlines()
except OSError:
    gpus = []
res = {"issue": 8, "gpu": gpus[0] if gpus else "unknown", "gpus": ngpu,
       "scaling_note": "training runs use cp GPUs each (dp = 1, global_batch 1); tokens/s per GPU = tokens/s / cp",
       "cp_attention": [], "training": [], "seed": None, "nccl_watchdog": None}
for f in sorted(glob.glob(os.path.join(out, "cp-attn-*.json"))):
    with open(f) as fh:
        res["cp_attention"].append(json.load(fh))
def rows_of(d):
    m = os.path.join(d, "metrics.jsonl")
    if not os.path.exists(m):
        return []
    with open(m) as fh:
        return [r for r in (json.loads(l) for l in fh if l.strip()) if "loss" in r and "step_ms" in r]
for d in sorted(glob.glob(os.path.join(out, "train-cp*"))):
    rows = rows_of(d)
    if not rows:
        continue
    name = os.path.basename(d)
    cp, seq = int(name.split("-")[1][2:]), int(name.split("-")[2][1:])
    timed = [r for r in rows if r.get("step", 0) > 2] or rows
    tps = statistics.median(r["tokens_per_s"] for r in timed)
    res["training"].append({"run": name, "cp": cp, "gpus": cp, "seq": seq, "steps": len(rows),
                            "step_ms": statistics.median(r["step_ms"] for r in timed),
                            "tokens_per_s": tps, "tokens_per_s_per_gpu": tps / cp,
                            "peak_mem_gib": max(r.get("peak_mem_gib", 0) for r in timed),
                            "mfu": statistics.median(r.get("mfu", 0) for r in timed)})
cmp_path = os.path.join(out, "seed-compare.json")
if os.path.exists(cmp_path):
    seed = {"compare": json.load(open(cmp_path)), "runs": []}
    for d in sorted(glob.glob(os.path.join(out, "seed-*"))):
        rows = rows_of(d)
        if rows:
            seed["runs"].append({"run": os.path.basename(d), "steps": len(rows), "final_loss": rows[-1]["loss"],
                                 "step_ms": statistics.median(r["step_ms"] for r in rows[2:] or rows),
                                 "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows[2:] or rows),
                                 "peak_mem_gib": max(r.get("peak_mem_gib", 0) for r in rows)})
    res["seed"] = seed
wd = os.path.join(out, "nccl-watchdog.inner")
if os.path.exists(wd):
    lines = open(wd).read().splitlines()
    res["nccl_watchdog"] = [l for l in lines if "flexcp: rank" in l or l.startswith("exit ")][:6]
os.makedirs(os.path.dirname(summary) or ".", exist_ok=True)
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
for r in (res["seed"] or {}).get("runs", []):
    print("{run}: {steps} steps, final loss {final_loss:.4f}, {tokens_per_s:.0f} tokens/s, {peak_mem_gib:.1f} GiB".format(**r))
PY
echo "== $failed failed"
exit "$failed"
