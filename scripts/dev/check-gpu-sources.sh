#!/usr/bin/env bash
# Compile-checks (-fsyntax-only) the GPU-only C++ sources on a machine without CUDA LibTorch: the
# core/*_cuda.cpp, core/*_nccl.cpp and test/gpu/*.cpp files that a CPU build leaves out. LibTorch's
# CPU packages ship the ATen/c10 CUDA headers, and the CUDA toolkit (nvcc, nccl.h) is here, so a
# typo in those files shows up in CPU CI instead of on the GPU machine. Each file is compiled with
# the flags of a CPU sibling from compile_commands.json (same target), plus the CUDA defines.
# Usage: scripts/dev/check-gpu-sources.sh BUILD_DIR    (exit status = number of files that failed)
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=$(cd "${1:?usage: check-gpu-sources.sh BUILD_DIR}" && pwd)
cuda_inc=${CUDA_HOME:-/usr/local/cuda}/include
[ -f "$build/compile_commands.json" ] || { echo "no $build/compile_commands.json (configure with CMAKE_EXPORT_COMPILE_COMMANDS=ON)"; exit 2; }
[ -f "$cuda_inc/cuda_runtime.h" ] || { echo "skipped: no CUDA headers in $cuda_inc"; exit 0; }
[ -f /usr/include/ATen/cuda/CUDAContext.h ] || [ -n "${TORCH_INCLUDE:-}" ] || { echo "skipped: no ATen CUDA headers"; exit 0; }
# The CPU package lacks the one header CMake generates for CUDA builds; an empty one stands in.
shim=$(mktemp -d)
trap 'rm -rf "$shim"' EXIT
mkdir -p "$shim/c10/cuda/impl" && echo '#pragma once' >"$shim/c10/cuda/impl/cuda_cmake_macros.h"
failed=0
check() {  # check SOURCE SIBLING
  local src=$1 sibling=$2 cmd
  cmd=$(python3 - "$build/compile_commands.json" "$root/$sibling" <<'PY'
import json, shlex, sys
entries = json.load(open(sys.argv[1]))
e = next((x for x in entries if x["file"] == sys.argv[2]), None)
if e is None:
    sys.exit(1)
args = shlex.split(e["command"]) if "command" in e else e["arguments"]
out, skip = [], False
for a in args:
    if skip:
        skip = False
        continue
    if a in ("-o", "-c", "-MF", "-MT", "-MQ", "-include", "-Xclang"):
        skip = True
        continue
    if a == sys.argv[2] or a.startswith("-MD") or a.endswith(".pch") or a.endswith(".gch") or "cmake_pch" in a:
        continue
    out.append(a)
print(shlex.join(out))
PY
) || { echo "== $src: no compile command for $sibling"; failed=$((failed + 1)); return; }
  if (cd "$build" && eval "$cmd" -fsyntax-only -I"$shim" -I"$cuda_inc" -DFLEXCP_WITH_TORCH_CUDA=1 -DFLEXCP_WITH_FFA=1 \
      -DFLEXCP_WITH_NCCL=1 -DFLEXCP_HAVE_TORCH_CUDA=1 "$root/$src") >"$shim/log" 2>&1; then
    echo "== $src ok"
  else
    echo "== $src FAILED"; grep -m 12 -E "error|note:" "$shim/log"; failed=$((failed + 1))
  fi
}
cd "$root"
for f in core/*_cuda.cpp core/*_nccl.cpp; do check "$f" core/fused_ops.cpp; done
for f in test/gpu/*.cpp; do check "$f" test/attention_test.cpp; done
echo "== $failed failed"
exit "$failed"
