#!/usr/bin/env bash
# Build flexcp on the GPU machine (Ubuntu, torch wheel with CUDA, no package registry). The Debian
# libraries travel in .deps (made by ../shared/tools/device-deps.sh .deps); see docs/gpu.md.
# Prints the environment to use the build with (eval it).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
P=$(bash "$root/.deps/unpack.sh" /tmp/pfx)
TP=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
export PKG_CONFIG_PATH=$P/lib/x86_64-linux-gnu/pkgconfig
build=${FLEXCP_BUILD_DIR:-$root/build-gpu}
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TP;$P" >&2
cmake --build "$build" -j "$(nproc)" "$@" >&2
echo "export LD_LIBRARY_PATH=$P/lib/x86_64-linux-gnu:$(python3 -c 'import torch,os; print(os.path.join(os.path.dirname(torch.__file__),"lib"))'):\${LD_LIBRARY_PATH:-}"
