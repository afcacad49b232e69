#!/usr/bin/env bash
# One device call that builds and checks everything a session changed, in priority order, each step
# under its own time limit (a hang costs its step, not the call). Run on the GPU machine from the
# repository root, with .deps carried (docs/gpu-build.md):
#   OUT=/some/dir bash scripts/dev/gpu-session.sh [STEP ...]
# Steps (default: build standalone bench gpu-tests smoke): build (build-gpu/ and build-ffa/ in parallel),
# standalone (ffa_standalone, all kernels), sanitize (memcheck + racecheck --quick of it), ffa-check
# (test/gpu/ffa_check.py), bench (attention_bench.py --which sdpa; BENCH_ARGS are passed on), gpu-tests (flexcp_gpu_tests [gpu]),
# smoke (scripts/gpu-smoke.sh), train (train-vs-hf.sh; TRAIN_ARGS are passed on), train-variants (flexcp
# alone under each environment of VARIANTS, ';'-separated, e.g. "FLEXCP_FFA_FWD_KERNEL=0;FLEXCP_FFA_BWD_KERNEL=1"),
# bench-variant (libffa built again with the nvcc flags VARIANT_NVCC_FLAGS, e.g. -DSOME_KNOB=1, into build-ffa-var/;
# its standalone, ffa_check.py and racecheck --quick run, then our kernels alone are timed with it, then with
# the default build, then with it again; VARIANT_TEST_ENV (e.g. a test knob NAME=1) is set for a second run of
# its standalone and for its ffa_check.py and racecheck, never for the timings), profile (ncu of
# flexcp's default forward and backward kernels on shape (a): profile-fwd.log, profile-bwd.log), build-ffa (the kernel
# library alone), variants (VARIANTS_NVCC="FLAGS;FLAGS;...": each set builds build-ffa-vI, runs its standalone, then
# the default and every variant are timed in turn, default first and last; needs build-ffa), sass (per-instruction
# stall samples of the forward on (a) and (b) causal and the backward on (a): sass-*.txt summaries, sass-*.csv.gz),
# ab (a baseline built from a copy of the tree with the files under AB_BASE (default .dev-base, paths as in
# the tree, e.g. .dev-base/cuda/ffa_fwd_overlap.cu from an older commit) laid over it, into build-ffa-base/;
# then baseline, default, baseline, default timed in turn; needs build-ffa), sass-dump (forward kernel 5's
# SASS, bf16 at D=64 and D=128, from build-ffa's object with cuobjdump, and its opcode counts:
# sass-fwd5-d64.txt, sass-fwd5-d128.txt; needs build-ffa), clock (SM clock, power and TFLOP/s per GHz of
# flexcp's forward and SDPA's, each run for seconds on (a) and (b) causal; needs build-ffa).
# Logs go to $OUT/<step>.log; one line per step says ok/FAILED and its seconds.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
out=${OUT:-/tmp/gpu-session}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build standalone bench gpu-tests smoke)
failed=0

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2 t0=$SECONDS rc; shift 2
  timeout "$limit" bash -c '"$@"' "$name" "$@" >"$out/$name.log" 2>&1  # bash -c: functions too
  rc=$?
  if [ $rc -eq 0 ]; then echo "== $name ok ($((SECONDS - t0)) s)"
  else
    echo "== $name FAILED rc=$rc ($((SECONDS - t0)) s)"; tail -n 25 "$out/$name.log"; failed=$((failed + 1))
  fi
}

bench_lib() {  # bench_lib NAME LIB LABEL: our kernels alone on LIB/libffa.so, then their summary lines
  FFA_LIB=$root/$2/libffa.so step "$1" 120 python3 scripts/bench/attention_bench.py --which ours
  echo "   $2: $3"
  grep -E "forward|backward alone|default pair" "$out/$1.log" | sed -E 's/ +/ /g; s/max\|.*//'
}

export env_file=$out/build-env.sh
build_all() {
  bash scripts/bench/build_ffa_lib.sh >"$out/build-ffa.log" 2>&1 & local ffa=$!
  bash scripts/gpu-build.sh >"$env_file" || return 1
  wait "$ffa"
}
export -f build_all
[ -f "$env_file" ] && . "$env_file"

for s in "${steps[@]}"; do
  case $s in
    build) step build 400 build_all; . "$env_file" ;;
    standalone) step standalone 150 ./build-ffa/ffa_standalone ;;
    sanitize)
      step memcheck 200 compute-sanitizer --tool memcheck --error-exitcode 3 ./build-ffa/ffa_standalone --quick
      step racecheck 300 compute-sanitizer --tool racecheck --error-exitcode 3 ./build-ffa/ffa_standalone --quick ;;
    ffa-check) FFA_LIB=$root/build-ffa/libffa.so step ffa-check 240 python3 test/gpu/ffa_check.py ;;
    bench) FFA_LIB=$root/build-ffa/libffa.so PYTHONUNBUFFERED=1 step bench 240 \
             python3 scripts/bench/attention_bench.py --which sdpa ${BENCH_ARGS:-} ;;
    gpu-tests) step gpu-tests 240 ./build-gpu/test/flexcp_gpu_tests "[gpu]" ;;
    smoke) step smoke 240 bash scripts/gpu-smoke.sh /tmp/gpu-session-smoke ;;  # (its files would crowd $OUT)
    train) step train 420 bash scripts/bench/train-vs-hf.sh ${TRAIN_ARGS:-} ;;
    train-variants)
      IFS=';' read -r -a variants <<<"${VARIANTS:-}"
      for v in "${variants[@]}"; do
        name=train-$(echo "$v" | tr ' =' '_-')
        step "$name" 200 env $v bash scripts/bench/train-vs-hf.sh --hf-modes "" ${TRAIN_ARGS:-}
        grep -hE '^flexcp |step by phase' "$out/$name.log"  # train-vs-hf.sh's table row and phases
      done ;;
    bench-variant)
      FFA_NVCC_FLAGS=${VARIANT_NVCC_FLAGS:-} step build-variant 300 bash scripts/bench/build_ffa_lib.sh "$root/build-ffa-var"
      step standalone-variant 150 ./build-ffa-var/ffa_standalone
      [ -n "${VARIANT_TEST_ENV:-}" ] && step standalone-variant-env 150 env ${VARIANT_TEST_ENV} ./build-ffa-var/ffa_standalone
      FFA_LIB=$root/build-ffa-var/libffa.so step ffa-check-variant 240 env ${VARIANT_TEST_ENV:-} python3 test/gpu/ffa_check.py
      step racecheck-variant 300 env ${VARIANT_TEST_ENV:-} compute-sanitizer --tool racecheck --error-exitcode 3 ./build-ffa-var/ffa_standalone --quick
      bench_lib bench-0-var build-ffa-var "VARIANT_NVCC_FLAGS='${VARIANT_NVCC_FLAGS:-}'"
      bench_lib bench-1-default build-ffa default
      bench_lib bench-2-var build-ffa-var "VARIANT_NVCC_FLAGS='${VARIANT_NVCC_FLAGS:-}'" ;;
    build-ffa) step build-ffa 300 bash scripts/bench/build_ffa_lib.sh ;;  # the kernels' library alone (no flexcp)
    sass-dump)
      for d in 64 128; do
        step "sass-dump-d$d" 60 bash -c "cuobjdump -sass build-ffa/ffa_fwd_overlap.o | python3 scripts/dev/sass_extract.py fwd_overlap_kernelI13__nv_bfloat16Li${d}ELb1 >$out/sass-fwd5-d$d.txt"
      done ;;
    ab)  # the current kernels against a baseline whose changed files lie under AB_BASE
      base_src=/tmp/ab-base-src base_files=${AB_BASE:-.dev-base}
      rm -rf "$base_src" && mkdir -p "$base_src" && cp -r cuda core test scripts "$base_src"/ &&
        cp -r "$base_files"/. "$base_src"/
      step build-base 300 bash "$base_src/scripts/bench/build_ffa_lib.sh" "$root/build-ffa-base"
      bench_lib bench-0-base build-ffa-base "baseline ($base_files)"
      bench_lib bench-1-default build-ffa default
      bench_lib bench-2-base build-ffa-base "baseline ($base_files)"
      bench_lib bench-3-default build-ffa default ;;
    variants)  # several variant builds (VARIANTS_NVCC, ';'-separated flag sets) timed against the default
      IFS=';' read -r -a vflags <<<"${VARIANTS_NVCC:-}"
      libs=(build-ffa)
      for i in "${!vflags[@]}"; do
        FFA_NVCC_FLAGS="${vflags[$i]}" bash scripts/bench/build_ffa_lib.sh "$root/build-ffa-v$i" >"$out/build-v$i.log" 2>&1 &
        libs+=("build-ffa-v$i")
      done
      wait
      for i in "${!vflags[@]}"; do step "standalone-v$i" 150 ./build-ffa-v$i/ffa_standalone; done
      libs+=(build-ffa)
      for n in "${!libs[@]}"; do
        lib=${libs[$n]}
        if [ "$lib" = build-ffa ]; then label=default; else label=${vflags[${lib#build-ffa-v}]}; fi
        bench_lib "bench-$n-$lib" "$lib" "$label"
      done ;;
    clock)  # SM clock and power of flexcp's forward and SDPA's on (a) and (b) causal (scripts/dev/clock_power.py)
      FFA_LIB=$root/build-ffa/libffa.so step clock-a 90 python3 scripts/dev/clock_power.py "a: S=8192" 4
      FFA_LIB=$root/build-ffa/libffa.so step clock-b 90 python3 scripts/dev/clock_power.py "b: S=8192 Hq=Hkv=16 D=128 causal" 4
      grep -h "TFLOP/s" "$out"/clock-a.log "$out"/clock-b.log ;;
    profile)
      FFA_LIB=$root/build-ffa/libffa.so step profile-fwd 200 bash scripts/bench/profile_fwd.sh "a: S=8192" fwd_overlap 1  # skip 1: the bench runs kernel 3 first, then 5
      FFA_LIB=$root/build-ffa/libffa.so step profile-bwd 200 bash scripts/bench/profile_bwd.sh "a: S=8192" 5 ;;
    sass)  # per-instruction stall samples: flexcp's forward on (a) and (b) causal, its backward on (a)
      for job in "fwd-a|profile_fwd.sh|a: S=8192|fwd_overlap" "fwd-b|profile_fwd.sh|b: S=8192 Hq=Hkv=16 D=128 causal|fwd_overlap" \
                 "bwd-a|profile_bwd.sh|a: S=8192|5"; do
        IFS='|' read -r name script shape arg <<<"$job"
        FFA_LIB=$root/build-ffa/libffa.so SASS_CSV=/tmp/sass-$name.csv step "sass-$name" 200 bash scripts/bench/$script "$shape" "$arg"
        python3 scripts/dev/sass_stalls.py /tmp/sass-$name.csv 40 >"$out/sass-$name.txt" 2>&1
        gzip -c /tmp/sass-$name.csv >"$out/sass-$name.csv.gz"
      done ;;
    *) echo "gpu-session.sh: unknown step '$s' (see the header)"; failed=$((failed + 1)) ;;
  esac
done
echo "== $failed failed"
exit $failed
