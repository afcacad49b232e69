#!/usr/bin/env bash
# Builds cuda/ (our attention kernels + the C ABI in ffa_capi.cu) into build-ffa/libffa.so for the
# Python tests and benchmarks (test/gpu/ffa_check.py, scripts/bench/attention_bench.py). No LibTorch.
#   scripts/bench/build_ffa_lib.sh [OUT_DIR]
# FFA_NVCC_FLAGS: extra nvcc flags (space-separated), e.g. -DSOME_KNOB=1 for a variant build
# that scripts/dev/gpu-session.sh's bench-variant step times against the default one.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:-$root/build-ffa}
mkdir -p "$out"
rm -f "$out"/*.o  # objects of sources since renamed or removed would be linked in below
nvcc=${NVCC:-nvcc}
flags=(-std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -I"$root" -Xcompiler -fPIC --expt-relaxed-constexpr -lineinfo)
read -r -a extra <<<"${FFA_NVCC_FLAGS:-}"
flags+=("${extra[@]}")
pids=()
for f in "$root"/cuda/*.cu; do
  "$root/scripts/nvcc_guard.sh" "$nvcc" "${flags[@]}" -c "$f" -o "$out/$(basename "$f" .cu).o" & pids+=($!)
done
g++ -std=c++17 -O2 -fPIC -I"$root" -c "$root/cuda/ffa_plan.cpp" -o "$out/ffa_plan.o" & pids+=($!)
failed=0
for p in "${pids[@]}"; do wait "$p" || failed=1; done
[ $failed -eq 0 ] || { echo "build_ffa_lib.sh: a compile failed (above)" >&2; exit 1; }
"$nvcc" -shared -gencode arch=compute_90a,code=sm_90a "$out"/*.o -o "$out/libffa.so" -lcuda
echo "$out/libffa.so"
# The standalone test (no LibTorch; small enough for compute-sanitizer).
"$nvcc" "${flags[@]}" "$root/test/gpu/standalone/ffa_standalone.cu" "$out"/ffa_*.o -o "$out/ffa_standalone" -lcuda
