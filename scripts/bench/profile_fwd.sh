#!/usr/bin/env bash
# Nsight Compute snapshot of one forward kernel (GPU machine): speed of light, warp stalls, instruction mix.
#   FFA_LIB=... scripts/bench/profile_fwd.sh "b: S=8192 Hq=Hkv=16 D=128 full" fwd_wgmma [SKIP]
# Kernel names: fwd_tma (kernel 0), fwd_overlap (kernels 3 and 5, one template: the bench launches
# kernel 3, v8, flexcp's default, first, so SKIP = 0 is kernel 3 and SKIP = 1 kernel 5, v10 persistent;
# "fwd_overlap_kernel.*Lb1" matches kernel 5 alone), fwd_wgmma (1), fwd_kernel (2).
# SASS_CSV=FILE: instead, the per-instruction warp stall samples of flexcp's forward (kernel 5, or
# FWD_KERNEL) on the shape, one launch, as CSV (source page, SASS with CUDA lines) into FILE;
# scripts/dev/sass_stalls.py summarizes it.
set -euo pipefail
shape=${1:-full}
kernel=${2:-fwd_wgmma}
skip=${3:-0}
cd "$(dirname "$0")/../.."
if [ -n "${SASS_CSV:-}" ]; then
  exec ncu --clock-control none --kernel-name "regex:${kernel}" --launch-count 1 --section SourceCounters \
    --page source --csv --print-source sass,cuda python3 scripts/bench/attn_once.py "$shape" "" "${FWD_KERNEL:-5}" >"$SASS_CSV"
fi
ncu --clock-control none --kernel-name "regex:${kernel}" --launch-skip "$skip" --launch-count 1 --section SpeedOfLight --section WarpStateStats \
    --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
    python3 scripts/bench/attention_bench.py --which ours --only "$shape"
