#!/usr/bin/env bash
# Runs one CUDA compile (its command line is the arguments; CMake uses this as the CUDA compiler
# launcher, scripts/bench/build_ffa_lib.sh calls it around nvcc) and fails it when ptxas reports that it
# serialized a kernel's wgmma instructions (C7510-C7516, "Potential Performance Loss"): the kernel is
# still correct, but its GEMMs no longer overlap the softmax and it runs ~25% slower, which no test sees
# (session 9: one register read on a path ptxas could not rule out cost forward kernel 5 a quarter).
set -uo pipefail
err=$(mktemp)
trap 'rm -f "$err"' EXIT
"$@" 2>"$err"
rc=$?
cat "$err" >&2
if grep -q "wgmma.mma_async instructions are serialized" "$err"; then
  echo "nvcc_guard: ptxas serialized wgmma instructions (the C75xx lines above); find the accumulator" \
    "register that is read or written while its wgmma may still run, and keep it out of that window" >&2
  [ $rc -eq 0 ] && rc=1
fi
exit $rc
