#!/usr/bin/env bash
# Nsight Compute snapshot of the TMA backward kernel (5, the default; GPU machine): one launch per given id on
# one benchmark shape (speed of light, warp stalls, scheduler, pipes, instruction mix). Clocks as found.
#   FFA_LIB=... scripts/bench/profile_bwd.sh "a: S=8192" 5
set -euo pipefail
cd "$(dirname "$0")/../.."
ncu --clock-control none --kernel-name "regex:bwd_dqwriter_kernel" --section SpeedOfLight --section WarpStateStats \
    --section SchedulerStats --section ComputeWorkloadAnalysis --section InstructionStats --section LaunchStats \
    --section Occupancy python3 scripts/bench/bwd_once.py "${1:-a: S=8192}" "${2:-5}"
