#!/usr/bin/env bash
# Nsight Compute snapshot of the TMA backward kernel (5, the default; GPU machine): one launch per given id on
# one benchmark shape (speed of light, warp stalls, scheduler, pipes, instruction mix). Clocks as found.
#   FFA_LIB=... scripts/bench/profile_bwd.sh "a: S=8192" 5
# SASS_CSV=FILE: instead, the per-instruction warp stall samples (SourceCounters, source page as CSV,
# SASS with the CUDA line of each instruction; the kernels are built with -lineinfo) into FILE, to see
# which barrier or wait the consumer warps stall at (the section averages include the writer warps,
# which wait at their hand-off barriers by design).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -n "${SASS_CSV:-}" ]; then
  exec ncu --clock-control none --kernel-name "regex:bwd_dqwriter_kernel" --launch-count 1 --section SourceCounters \
    --page source --csv --print-source sass,cuda python3 scripts/bench/attn_once.py "${1:-a: S=8192}" "${2:-5}" 0 >"$SASS_CSV"
fi
ncu --clock-control none --kernel-name "regex:bwd_dqwriter_kernel" --section SpeedOfLight --section WarpStateStats \
    --section SchedulerStats --section ComputeWorkloadAnalysis --section InstructionStats --section LaunchStats \
    --section Occupancy python3 scripts/bench/attn_once.py "${1:-a: S=8192}" "${2:-5}" 0
