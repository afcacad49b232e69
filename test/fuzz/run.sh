#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, ASan + UBSan) and runs them.
#   test/fuzz/run.sh [--seconds N] [--build-dir DIR] [--merge] [--no-build | --build-only] [TARGET...]
# Each target first replays its regression inputs (test/fuzz/regressions/<target>/, every crash ever
# found) and then fuzzes for N seconds (default 20) from test/fuzz/corpus/<target>/. New inputs go
# to a scratch folder; --merge adds the ones that grow coverage to the corpus (for long local runs:
# test/fuzz/run.sh --seconds 1800 --merge). A crash leaves its input in the scratch folder and the
# script fails; copy it into regressions/<target>/ once fixed.
# Exit 77 (CTest: skipped) when clang or libFuzzer is not installed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
seconds=20
build="$root/build/fuzz"
merge=0
do_build=1
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --build-dir) build=$2; shift 2 ;;
    --merge) merge=1; shift ;;
    --no-build) do_build=0; shift ;;
    --build-only) do_build=2; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) targets+=("$1"); shift ;;
  esac
done
[ ${#targets[@]} -eq 0 ] && targets=(safetensors shard manifest config tokenizer_json tokenizer_text attention_spec)

if ! command -v clang++ >/dev/null; then echo "fuzz: clang++ not installed (apt-get install clang libclang-rt-dev)"; exit 77; fi
if [ $do_build != 0 ]; then
  if [ ! -f "$build/build.ninja" ]; then
    CC=clang CXX=clang++ cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DFLEXCP_BUILD_FUZZ=ON -DFLEXCP_BUILD_TESTS=OFF -DFLEXCP_WITH_CUDA=OFF -DFLEXCP_WITH_MPI=OFF >/dev/null
  fi
  cmake --build "$build" -j "${FLEXCP_FUZZ_JOBS:-2}" --target $(printf 'fuzz_%s ' "${targets[@]}")
  [ $do_build = 2 ] && exit 0
fi

# Sanitizer reports abort the run (exit code != 0); leak checking stays on except for the LibTorch
# target, whose static initializers keep allocations alive on purpose.
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
status=0
for t in "${targets[@]}"; do
  exe="$build/test/fuzz/fuzz_$t"
  scratch=$(mktemp -d "${TMPDIR:-/tmp}/flexcp_fuzz_$t.XXXXXX")
  asan="abort_on_error=1:detect_stack_use_after_return=1"
  [ "$t" = safetensors ] && asan="$asan:detect_leaks=0"
  export ASAN_OPTIONS=$asan
  opts=(-max_len=65536 -timeout=60 -rss_limit_mb=2048 -artifact_prefix="$scratch/" -print_final_stats=1)
  case "$t" in safetensors|manifest|tokenizer_json) opts+=(-dict="$here/json.dict") ;; esac
  if [ -d "$here/regressions/$t" ] && [ -n "$(ls -A "$here/regressions/$t")" ]; then
    echo "== fuzz_$t: replaying $(ls "$here/regressions/$t" | wc -l) regression inputs"
    if ! "$exe" "${opts[@]}" "$here/regressions/$t"/* >"$scratch/replay.log" 2>&1; then
      tail -40 "$scratch/replay.log"; echo "fuzz_$t: a regression input fails again"; status=1; continue
    fi
  fi
  echo "== fuzz_$t: ${seconds}s from $(ls "$here/corpus/$t" | wc -l) corpus inputs"
  set +e
  corpora=("$scratch" "$here/corpus/$t")
  [ -d "$here/regressions/$t" ] && corpora+=("$here/regressions/$t")
  "$exe" "${opts[@]}" -max_total_time="$seconds" "${corpora[@]}" >"$scratch/fuzz.log" 2>&1
  rc=$?
  set -e
  grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ *DONE)' "$scratch/fuzz.log" | tr '\n' ' '; echo
  if [ $rc -eq 3 ] && grep -q "tokenizer file not found" "$scratch/fuzz.log"; then
    echo "fuzz_$t: skipped (no Llama 3 tokenizer.json; run scripts/fetch-data.sh)"
    [ ${#targets[@]} -eq 1 ] && exit 77
    continue
  fi
  if [ $rc -ne 0 ]; then
    tail -60 "$scratch/fuzz.log"; echo "fuzz_$t: FAILED (rc $rc); inputs in $scratch"; status=1; continue
  fi
  if [ $merge = 1 ]; then
    "$exe" -merge=1 "$here/corpus/$t" "$scratch" >/dev/null 2>&1 || true
  fi
  rm -rf "$scratch"
done
exit $status
