#!/usr/bin/env bash
# Issue 7's side-by-side on one GPU, in one call: the HF transformers reference step
# (scripts/bench/hf_train_step.py, the method of ../shared/anchors) and `flexcp train
# configs/llama3.2-1b.yaml` on the same work (random init, seq 8192, micro-batch 1, one micro-batch per
# optimizer step, fp32 master weights). Prints step time, tokens/s, MFU, peak memory and the ratios;
# writes the numbers as JSON.
#
#   scripts/bench/train-vs-hf.sh [--steps N] [--seq S] [--hf-modes "amp_fp32_master pure_bf16"]
#                                [--breakdown] [--json FILE] [-- --set key=value ...]
#
# --breakdown also runs one flexcp step under ncu (kernels serialised) and sums GPU time by kind of
# kernel (scripts/bench/kernel_breakdown.py); flexcp's own per-phase times (CUDA events, no
# serialisation) come from `--profile-step` in every run. Needs build-gpu/ (scripts/gpu-build.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=${FLEXCP_BIN:-$root/build-gpu/app/flexcp}
steps=12 seq=8192 modes="amp_fp32_master" breakdown=0 json="" extra=()
while [ $# -gt 0 ]; do
  case $1 in
    --steps) steps=$2; shift 2 ;;
    --seq) seq=$2; shift 2 ;;
    --hf-modes) modes=$2; shift 2 ;;
    --breakdown) breakdown=1; shift ;;
    --json) json=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "train-vs-hf.sh: unknown argument '$1' (see the header of $0)" >&2; exit 2 ;;
  esac
done
[ -x "$bin" ] || { echo "train-vs-hf.sh: $bin not found; build first: eval \"\$(bash scripts/gpu-build.sh)\"" >&2; exit 2; }
tmp=$(mktemp -d)
results=$tmp/results.jsonl

for mode in $modes; do
  python3 "$root/scripts/bench/hf_train_step.py" --seq "$seq" --mode "$mode" | tail -n 1 >>"$results"
done

flexcp_args=(train "$root/configs/llama3.2-1b.yaml" --set data.synthetic=true --set train.global_batch=1
             --set train.micro_batch=1 --set train.seq_len="$seq"
             --set checkpoint.every=0 --set checkpoint.at_end=false --set logging.dir="$tmp/flexcp" --quiet
             "${extra[@]}")
"$bin" "${flexcp_args[@]}" --set train.steps="$steps" --profile-step $((steps - 1)) >"$tmp/flexcp.log" 2>&1 ||
  { tail -n 20 "$tmp/flexcp.log"; exit 1; }
python3 - "$tmp/flexcp/metrics.jsonl" "$seq" >>"$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
timed = rows[3:] if len(rows) > 4 else rows          # the first steps warm up allocator and kernels
ms = statistics.median(r["step_ms"] for r in timed)
prof = dict(next((r["profile_ms"] for r in rows if "profile_ms" in r), []))
tok_s = int(sys.argv[2]) / (ms / 1e3)
mfu = statistics.median(r["mfu"] for r in timed)
print(json.dumps({"runner": "flexcp", "mode": "bf16 + fp32 master", "seq": int(sys.argv[2]), "step_ms": ms,
                  "tokens_per_s": tok_s, "mfu": mfu, "peak_mem_gib": max(r["peak_mem_gib"] for r in rows),
                  "phases_ms": prof, "final_loss": rows[-1]["loss"]}))
PY

if [ "$breakdown" = 1 ]; then
  ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \
    "$bin" "${flexcp_args[@]}" --set train.steps=3 --profile-step 3 >"$tmp/ncu.csv" 2>"$tmp/ncu.err" ||
    { tail -n 5 "$tmp/ncu.err"; }
  python3 "$root/scripts/bench/kernel_breakdown.py" "$tmp/ncu.csv" --json "$tmp/breakdown.json" || true
fi

python3 - "$results" "$json" "$tmp/breakdown.json" <<'PY'
import json, os, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'runner':8s} {'mode':20s} {'step ms':>8s} {'tokens/s':>9s} {'MFU':>6s} {'peak GiB':>9s}")
for r in rows:
    print(f"{r['runner']:8s} {r['mode']:20s} {r['step_ms']:8.1f} {r['tokens_per_s']:9.0f} {100*r['mfu']:5.1f}% {r['peak_mem_gib']:9.1f}")
ours = next(r for r in rows if r["runner"] == "flexcp")
for r in rows:
    if r["runner"] == "hf":
        print(f"flexcp / HF {r['mode']}: tokens/s x{ours['tokens_per_s'] / r['tokens_per_s']:.2f}, "
              f"peak memory x{ours['peak_mem_gib'] / r['peak_mem_gib']:.2f}")
if ours.get("phases_ms"):
    tot = sum(ours["phases_ms"].values())
    print("flexcp step by phase (CUDA events): " + " | ".join(f"{k} {v:.1f} ms ({100*v/tot:.0f}%)" for k, v in ours["phases_ms"].items()))
out = {"results": rows}
if os.path.exists(sys.argv[3]):
    out["kernel_breakdown"] = json.load(open(sys.argv[3]))
if sys.argv[2]:
    tmp = sys.argv[2] + ".tmp"
    json.dump(out, open(tmp, "w"), indent=1)
    os.replace(tmp, sys.argv[2])
    print("wrote", sys.argv[2])
PY
