#!/usr/bin/env bash
# Configures and builds flexcp into build/ (or $FLEXCP_BUILD_DIR). Runs the set-up first when a
# dependency is missing. Extra arguments go to `cmake --build` (e.g. --target flexcp).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${FLEXCP_BUILD_DIR:-$root/build}
bash "$root/scripts/setup.sh"
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
if [ ! -f "$build/CMakeCache.txt" ]; then
  cmake -S "$root" -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=${FLEXCP_BUILD_TYPE:-Release} >/dev/null
fi
jobs=${FLEXCP_JOBS:-$(nproc)}
cmake --build "$build" -j "$jobs" "$@"
