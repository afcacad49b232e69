#!/usr/bin/env bash
# All GPU checks of the attention kernels in one go (on a machine with a Hopper GPU):
#   1. build cuda/ into build-ffa/ (libffa.so for Python, ffa_standalone) unless FFA_LIB is set
#   2. ffa_standalone (float64 CPU reference) plain, under compute-sanitizer memcheck and racecheck
#   3. test/gpu/ffa_check.py: random slice sets vs the fp32 reference, the bf16 error convention
#   4. with DEPS=<folder of .debs> (docs/gpu-build.md): cmake build of flexcp_gpu_tests, run [gpu]
# Usage: scripts/bench/run_gpu_tests.sh [--quick]
# Each step has a time limit (STEP_TIMEOUT seconds, default 300; the plain standalone run 120), so a
# kernel that deadlocks fails its step instead of eating the whole device call; when the plain
# standalone run times out, the sanitizer runs of it are skipped (they would hang the same way).
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
status=0
if [ -z "${FFA_LIB:-}" ]; then
  bash scripts/bench/build_ffa_lib.sh >/dev/null || exit 1
  export FFA_LIB=$root/build-ffa/libffa.so
fi
sa=$(dirname "$FFA_LIB")/ffa_standalone
limit=${STEP_TIMEOUT:-300}
echo "== standalone"; timeout 120 "$sa" | grep -v " ok$"
rc=${PIPESTATUS[0]}
[ "$rc" -ne 0 ] && status=1
if [ "$rc" -eq 124 ]; then
  echo "standalone timed out (a deadlock?): memcheck and racecheck skipped"
else
  echo "== memcheck"; timeout "$limit" compute-sanitizer --tool memcheck --error-exitcode 3 "$sa" | tail -n 1 || status=1
  echo "== racecheck"; timeout "$limit" compute-sanitizer --tool racecheck --error-exitcode 3 "$sa" --quick | tail -n 1 || status=1
fi
echo "== ffa_check.py"
PYTHONUNBUFFERED=1 timeout "$limit" python3 test/gpu/ffa_check.py "$@" | grep -v "^\[ok" || status=1
if [ -n "${DEPS:-}" ]; then
  echo "== flexcp_gpu_tests"
  P=$(bash "$DEPS/unpack.sh" /tmp/pfx)
  TP=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
  export PKG_CONFIG_PATH=$P/lib/x86_64-linux-gnu/pkgconfig
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TP;$P" >/dev/null &&
    cmake --build build-gpu -j "$(nproc)" --target flexcp_gpu_tests 2>&1 | grep -E "error|FAILED" | head -20
  LD_LIBRARY_PATH=$P/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-} ./build-gpu/test/flexcp_gpu_tests "[gpu]" | tail -n 4 ||
    status=1
fi
echo "== status $status"
exit $status
