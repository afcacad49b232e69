#!/usr/bin/env bash
# Distributed faults (docs/reliability.md, issue 9): 4 ranks of `flexcp train` (tiny model, synthetic
# data, CPU, cp = 2 so that both world and cp-group collectives run), one of which fails at step 3:
#   mpi_dead     mpirun; rank 2 SIGKILLs itself          -> the job ends, mpirun names rank 2
#   mpi_hang     mpirun; rank 2 sleeps forever           -> a watchdog line names rank 2, MPI_Abort ends the job
#   tcp_dead     4 ranks started by hand (no launcher)   -> every survivor exits 3 at once: "rank 1 (host:port)
#                rank 1 SIGKILLs itself                     closed its connection", or "rank 1 (host:port) died or
#                                                           exited: rank 0 saw ..." (rank 0's goodbye)
#   launch_dead  flexcp launch (tcp); rank 2 dies        -> exit != 0, rank 2 named
#   launch_hang  flexcp launch (tcp); rank 2 hangs       -> exit 3, a watchdog line names rank 2
# and 2 ranks under mpirun whose config, binary or data set differ:
#   mismatch_config, mismatch_binary, mismatch_data     -> exit 2 at start-up, one line naming rank 1 and what differs
# Every case runs under `timeout`: reaching it is a hang, i.e. a failure. The dead cases use
# parallel.timeout_s = 60, so that an exit within seconds shows the death was noticed, not timed out.
# Usage: dead_rank_test.sh FLEXCP_BINARY SOURCE_DIR [--only CASE[,CASE]] [--repeat N] [--report FILE]
set -uo pipefail
flexcp=$(readlink -f "$1"); src=$(cd "$2" && pwd); shift 2  # absolute: one case changes directory
only=""; repeat=1; report=""
while [ $# -gt 0 ]; do
  case "$1" in
    --only) only=",$2,"; shift 2 ;;
    --repeat) repeat=$2; shift 2 ;;
    --report) report=$2; shift 2 ;;
    *) echo "unknown argument $1"; exit 2 ;;
  esac
done
work=$(mktemp -d "${TMPDIR:-/tmp}/flexcp_dead_rank.XXXXXX")
cfg="$src/configs/tiny.yaml"
hang_timeout=8   # parallel.timeout_s of the hang cases
limit=90         # seconds before a case counts as hung
common=(--set data.synthetic=true --set model.vocab_size=512 --set model.hidden_size=64 --set model.intermediate_size=128
        --set model.bos_token_id=1 --set model.eos_token_id=2 --set model.num_layers=2 --set model.num_heads=4
        --set model.num_kv_heads=2 --set model.head_dim=16 --set train.seq_len=64 --set train.global_batch=4
        --set train.micro_batch=1 --set train.warmup=2 --set train.steps=8 --set train.device=cpu
        --set parallel.attention=reference --set parallel.cp=2 --set train.val_every=0 --set checkpoint.every=0
        --set logging.quiet=true)
mpirun_cmd=(mpirun --oversubscribe --allow-run-as-root)
export OMP_NUM_THREADS=1 OMPI_MCA_rmaps_base_oversubscribe=1
have_mpirun=1
command -v mpirun >/dev/null || have_mpirun=0

failures=0
declare -A tries passes
now_us() { echo "${EPOCHREALTIME/./}"; }
# Prefixes each line with the seconds since $1 (microseconds since the epoch).
stamp() {
  local t0=$1 line
  while IFS= read -r line; do printf '%d.%03d %s\n' $((($(now_us) - t0) / 1000000)) $(((($(now_us) - t0) / 1000) % 1000)) "$line"; done
}
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", (b - a) / 1e6 }'; }
# Seconds (since the case started) of the first line matching $2 in log $1.
first_at() { grep -m1 -E "$2" "$1" | cut -d' ' -f1; }
record() {  # record CASE OK(0/1) DETAIL
  local name=$1 ok=$2 detail=$3
  tries[$name]=$((${tries[$name]:-0} + 1))
  if [ "$ok" -eq 0 ]; then passes[$name]=$((${passes[$name]:-0} + 1)); echo "ok: $name: $detail"
  else
    failures=$((failures + 1)); echo "FAIL: $name: $detail"
    mkdir -p "$work/failed/$name.$iter" && cp "$work/$name"*.log "$work/failed/$name.$iter/" 2>/dev/null  # kept for a look
  fi
  [ -n "$report" ] && printf '{"case": "%s", "ok": %s, "detail": "%s"}\n' "$name" "$([ "$ok" -eq 0 ] && echo true || echo false)" \
    "$(echo "$detail" | tr '"' "'")" >>"$report"
}
want() { [ -z "$only" ] || [[ "$only" == *",$1,"* ]]; }

# Runs "$@" with stamped output into $work/$1.log; sets rc and the fault-to-exit latency.
run_case() {
  local name=$1; shift
  local log="$work/$name.log" t0
  t0=$(now_us)
  timeout -k 5 $limit "$@" 2>&1 | stamp "$t0" >"$log"
  rc=${PIPESTATUS[0]}
  end=$(secs "$t0" "$(now_us)")
}
# Seconds from the injected fault's message to the end of the case ("?" when the fault never came).
latency() {
  local at
  at=$(first_at "$1" "FLEXCP_TEST_(DIE|HANG)_AT_STEP: rank")
  [ -z "$at" ] && { echo "?"; return; }
  awk -v a="$at" -v b="$end" 'BEGIN { printf "%.1f", b - a }'
}
within() { [ "$1" != "?" ] && awk -v x="$1" -v m="$2" 'BEGIN { exit !(x <= m) }'; }

case_mpi_dead() {
  run_case mpi_dead env FLEXCP_TEST_DIE_AT_STEP=2:3 "${mpirun_cmd[@]}" -np 4 -x FLEXCP_TEST_DIE_AT_STEP "$flexcp" train "$cfg" \
    "${common[@]}" --set logging.dir="$work/mpi_dead" --set parallel.timeout_s=60
  local lat; lat=$(latency "$work/mpi_dead.log")
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && grep -q "process rank 2 with PID .* exited on signal 9" "$work/mpi_dead.log" && within "$lat" 20
  record mpi_dead $? "exit $rc, the others gone ${lat} s after rank 2 died; $(grep -m1 -o 'mpirun noticed.*' "$work/mpi_dead.log")"
}

case_mpi_hang() {
  run_case mpi_hang env FLEXCP_TEST_HANG_AT_STEP=2:3 "${mpirun_cmd[@]}" -np 4 -x FLEXCP_TEST_HANG_AT_STEP "$flexcp" train "$cfg" \
    "${common[@]}" --set logging.dir="$work/mpi_hang" --set parallel.timeout_s=$hang_timeout
  local lat; lat=$(latency "$work/mpi_hang.log")
  [ $rc -eq 3 ] && grep -qE "flexcp: rank [013] of 4 \(mpi\): .* has waited .* rank 2 has not reached it .* and is alive" \
    "$work/mpi_hang.log" && within "$lat" $((hang_timeout + 15))
  record mpi_hang $? "exit $rc, job gone ${lat} s after rank 2 hung (timeout ${hang_timeout} s); $(grep -m1 -o 'flexcp: rank [0-9] of 4.*' "$work/mpi_hang.log" | cut -c1-240)"
}

case_launch_dead() {
  run_case launch_dead env FLEXCP_TEST_DIE_AT_STEP=2:3 "$flexcp" launch --nproc-per-node 4 -- train "$cfg" "${common[@]}" \
    --set logging.dir="$work/launch_dead" --set parallel.timeout_s=60
  local lat; lat=$(latency "$work/launch_dead.log")
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && grep -q "rank 2 exited with code 137" "$work/launch_dead.log" && within "$lat" 20
  record launch_dead $? "exit $rc, all gone ${lat} s after rank 2 died; $(grep -m1 -o 'rank 2 exited.*' "$work/launch_dead.log")"
}

case_launch_hang() {
  run_case launch_hang env FLEXCP_TEST_HANG_AT_STEP=2:3 "$flexcp" launch --nproc-per-node 4 -- train "$cfg" "${common[@]}" \
    --set logging.dir="$work/launch_hang" --set parallel.timeout_s=$hang_timeout
  local lat; lat=$(latency "$work/launch_hang.log")
  [ $rc -eq 3 ] && grep -qE "flexcp: rank [013] of 4 \(tcp\): .* has waited .* rank 2 has not reached it .* and is alive" \
    "$work/launch_hang.log" && within "$lat" $((hang_timeout + 15))
  record launch_hang $? "exit $rc, all gone ${lat} s after rank 2 hung (timeout ${hang_timeout} s); $(grep -m1 -o 'flexcp: rank [0-9] of 4.*' "$work/launch_hang.log" | cut -c1-240)"
}

# No launcher to clean up: the survivors must notice by themselves. Rank 1 dies: its cp partner,
# rank 0, sees it first and stops; ranks 2 and 3 see rank 0's connection close at the next gradient
# all-reduce, and its goodbye makes them name rank 1, not rank 0.
case_tcp_dead() {
  local port=$((20000 + RANDOM % 20000)) r t0 pids=() bad=0 detail="" lat code
  t0=$(now_us)
  for r in 0 1 2 3; do
    RANK=$r LOCAL_RANK=$r WORLD_SIZE=4 LOCAL_WORLD_SIZE=4 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port FLEXCP_TEST_DIE_AT_STEP=1:3 \
      timeout -k 5 $limit "$flexcp" train "$cfg" "${common[@]}" --set logging.dir="$work/tcp_dead" --set parallel.timeout_s=60 \
      > >(stamp "$t0" >"$work/tcp_dead.$r.log") 2>&1 &
    pids+=($!)
  done
  for r in 0 1 2 3; do
    wait "${pids[$r]}" 2>/dev/null; code=$?
    if [ $r -eq 1 ]; then
      [ $code -eq 137 ] || { bad=1; detail+=" rank 1 exit $code (want 137);"; }
    else
      # Rank 1 itself, or (when another survivor saw it first and stopped) rank 1 through that one's goodbye.
      [ $code -eq 3 ] && grep -qE "rank $r: rank 1 \(127.0.0.1:[0-9]*\) (closed its connection during .*: it died or exited|died or exited: rank [023] saw)" \
        "$work/tcp_dead.$r.log" || { bad=1; detail+=" rank $r exit $code: $(tail -c 300 "$work/tcp_dead.$r.log");"; }
    fi
  done
  end=$(secs "$t0" "$(now_us)")
  sleep 0.2  # the stamping readers finish their files
  lat=$(latency "$work/tcp_dead.1.log")
  [ $bad -eq 0 ] && within "$lat" 20
  record tcp_dead $? "ranks 0, 2, 3 exited 3 naming rank 1, ${lat} s after it died;$detail $(grep -ho 'rank [023]: rank 1.*' "$work"/tcp_dead.[023].log | cut -c1-200 | tr '\n' '|')"
}

# Two ranks under mpirun that differ in one way (MPMD: `-np 1 A : -np 1 B`).
case_mismatch() {
  local name=$1 want=$2; shift 2
  local a=("$flexcp" train "$cfg" "${common[@]}" --set parallel.cp=1 --set logging.dir="$work/$name")
  run_case "$name" "${mpirun_cmd[@]}" -np 1 "${a[@]}" : -np 1 "$@"
  [ $rc -eq 2 ] && grep -q "error: startup check: all ranks must run the same flexcp binary, config and data, but $want" \
    "$work/$name.log" && ! grep -q "step " "$work/$name.log"
  record "$name" $? "exit $rc in ${end} s: $(grep -m1 -o 'error: startup check.*' "$work/$name.log" | cut -c1-260)"
}
case_mismatch_config() {
  case_mismatch mismatch_config "rank 1's config differs from rank 0's (rank 1 vs rank 0: train.lr: 0.001 vs 0.003)" \
    "$flexcp" train "$cfg" "${common[@]}" --set parallel.cp=1 --set logging.dir="$work/mismatch_config" --set train.lr=0.001
}
case_mismatch_binary() {
  cp "$flexcp" "$work/flexcp-other" && printf 'x' >>"$work/flexcp-other"  # still runs; another sha256
  case_mismatch mismatch_binary "rank 1 runs a different flexcp binary than rank 0" \
    "$work/flexcp-other" train "$cfg" "${common[@]}" --set parallel.cp=1 --set logging.dir="$work/mismatch_binary"
}
case_mismatch_data() {
  # The same relative data.path in two working directories with different manifests.
  mkdir -p "$work/wd_a/data" "$work/wd_b/data"
  echo '{"format": "a"}' >"$work/wd_a/data/manifest.json"
  echo '{"format": "b"}' >"$work/wd_b/data/manifest.json"
  local d=(--set data.synthetic=false --set data.path=data --set parallel.cp=1)
  run_case mismatch_data "${mpirun_cmd[@]}" -np 1 -wdir "$work/wd_a" "$flexcp" train "$cfg" "${common[@]}" "${d[@]}" \
    --set logging.dir="$work/mismatch_data" : -np 1 -wdir "$work/wd_b" "$flexcp" train "$cfg" "${common[@]}" "${d[@]}" \
    --set logging.dir="$work/mismatch_data"
  [ $rc -eq 2 ] && grep -q "but rank 1's data set differs from rank 0's (data/manifest.json: " "$work/mismatch_data.log"
  record mismatch_data $? "exit $rc in ${end} s: $(grep -m1 -o 'error: startup check.*' "$work/mismatch_data.log" | cut -c1-260)"
}

mpi_cases=(mpi_dead mpi_hang mismatch_config mismatch_binary mismatch_data)
for ((iter = 1; iter <= repeat; iter++)); do
  for c in mpi_dead mpi_hang tcp_dead launch_dead launch_hang mismatch_config mismatch_binary mismatch_data; do
    want "$c" || continue
    if [ $have_mpirun -eq 0 ] && [[ " ${mpi_cases[*]} " == *" $c "* ]]; then echo "skipped: $c (no mpirun)"; continue; fi
    "case_$c"
  done
done
echo "summary:"
for c in "${!tries[@]}"; do echo "  $c: ${passes[$c]:-0}/${tries[$c]} passed"; done
if [ $failures -eq 0 ]; then rm -rf "$work"; echo "PASS"; exit 0; fi
echo "FAILED ($failures); logs in $work"; exit 1
