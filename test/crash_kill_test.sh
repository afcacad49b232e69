#!/usr/bin/env bash
# Crash safety of `flexcp train` (docs/reliability.md):
#  1. SIGKILL at random times, many times (--kills, default 20), half of them aimed at checkpoint
#     writes (sent as soon as a step_*.partial folder appears). After every kill the newest complete
#     checkpoint must load, and when the run is finally allowed to finish, metrics.jsonl must equal an
#     uninterrupted run's record for record (loss, grad norm, lr: bit-exact, as JSON prints doubles).
#  2. A full disk during a checkpoint write (a small tmpfs, when we may mount one) and a file size
#     limit (ulimit -f with SIGXFSZ ignored, so write() fails with EFBIG): the run must stop with
#     exit code 2 and a message naming the checkpoint, and the previous checkpoint must stay loadable.
#  3. keep_last: at most checkpoint.keep_last complete checkpoints remain.
# Usage: crash_kill_test.sh FLEXCP_BINARY SOURCE_DIR [--kills N] [--work DIR] [--report FILE]
set -uo pipefail
flexcp=$1; src=$2; shift 2
kills=20
work=$(mktemp -d "${TMPDIR:-/tmp}/flexcp_kill.XXXXXX")
report=""
while [ $# -gt 0 ]; do
  case "$1" in
    --kills) kills=$2; shift 2 ;;
    --work) work=$2; mkdir -p "$work"; shift 2 ;;
    --report) report=$2; shift 2 ;;
    *) echo "unknown argument $1"; exit 2 ;;
  esac
done
cfg="$src/configs/tiny.yaml"
steps=16
keep=2
common=(--set data.synthetic=true --set model.vocab_size=512 --set model.hidden_size=64 --set model.intermediate_size=128
        --set model.bos_token_id=1 --set model.eos_token_id=2 --set model.num_layers=2 --set model.num_heads=4 --set model.num_kv_heads=2 --set model.head_dim=16
        --set train.seq_len=64 --set train.global_batch=4 --set train.micro_batch=2 --set train.warmup=2
        --set train.device=cpu --set parallel.attention=reference --set train.val_every=0
        --set checkpoint.every=1 --set checkpoint.keep_last=$keep --set logging.quiet=true)
export OMP_NUM_THREADS=1
failures=0
check() {  # check CONDITION-EXIT-CODE MESSAGE
  if [ "$1" -ne 0 ]; then echo "FAIL: $2"; failures=$((failures + 1)); else echo "ok: $2"; fi
}
records() { grep -o '"step":[0-9]*\|"loss":[^,]*\|"lr":[^,]*\|"grad_norm":[^,]*' "$1" | paste -d' ' - - - - ; }
# Newest complete checkpoint: a step_<8 digits> folder (no .partial/.deleting suffix) with state.json.
latest() {
  local d out=""
  for d in "$1"/step_*; do
    [[ "$(basename "$d")" =~ ^step_[0-9]{8}$ ]] && [ -f "$d/state.json" ] && out=$d
  done
  echo "$out"
}
# Loads the newest checkpoint of a run folder and stops right there: a resume with train.steps set to
# the checkpoint's step runs no step but reads every tensor. Prints nothing when there is none.
load_check() {
  local run=$1 ck step
  ck=$(latest "$run/checkpoints")
  [ -z "$ck" ] && return 0
  step=$((10#${ck##*step_}))
  "$flexcp" train "$cfg" "${common[@]}" --set logging.dir="$run" --set train.steps="$step" --set train.warmup=0 --resume >"$run/load.log" 2>&1
}

# ---- 1. reference run
"$flexcp" train "$cfg" "${common[@]}" --set logging.dir="$work/ref" --set train.steps=$steps >"$work/ref.log" 2>&1
check $? "uninterrupted run of $steps steps"
[ $failures -eq 0 ] || { tail -5 "$work/ref.log"; exit 1; }
records "$work/ref/metrics.jsonl" >"$work/ref.records"
t0=$(date +%s.%N)
"$flexcp" train "$cfg" "${common[@]}" --set logging.dir="$work/timing" --set train.steps=$steps >/dev/null 2>&1
ref_s=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
t0=$(date +%s.%N)
"$flexcp" train "$cfg" "${common[@]}" --set logging.dir="$work/timing1" --set train.steps=1 --set train.warmup=0 >/dev/null 2>&1
start_s=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
echo "one uninterrupted run: ${ref_s}s, of which start-up and one step ${start_s}s"

# ---- 1. kills
run="$work/killed"
in_ckpt=0; loads_ok=0; load_fail=0; done_early=0; no_ckpt=0
delivered=0
for ((k = 1; delivered < kills && k <= 6 * kills; k++)); do
  "$flexcp" train "$cfg" "${common[@]}" --set logging.dir="$run" --set train.steps=$steps --resume >>"$run.log" 2>&1 &
  pid=$!
  if [ $((k % 2)) -eq 0 ]; then
    # Aim at a checkpoint write: wait for the .partial folder of a step 1 to 3 steps past the newest
    # complete checkpoint (or give up after the run's length).
    cur=$(latest "$run/checkpoints"); cur=${cur##*step_}; cur=$((10#${cur:-0}))
    target=$(printf '%s/checkpoints/step_%08d.partial' "$run" $((cur + 1 + RANDOM % 3)))
    for ((w = 0; w < 2000; w++)); do
      [ -d "$target" ] && break
      kill -0 $pid 2>/dev/null || break
      sleep 0.005
    done
    sleep "0.00$((RANDOM % 10))"
  else
    # Uniform over the run, start-up (loading LibTorch) mostly left out.
    sleep "$(awk -v r=$RANDOM -v t="$ref_s" -v s="$start_s" 'BEGIN { printf "%.3f", 0.8 * s + r / 32768 * (t - 0.8 * s) }')"
  fi
  if kill -9 $pid 2>/dev/null; then delivered=$((delivered + 1)); else done_early=$((done_early + 1)); fi
  wait $pid 2>/dev/null
  compgen -G "$run/checkpoints/*.partial" >/dev/null && in_ckpt=$((in_ckpt + 1))
  if [ -z "$(latest "$run/checkpoints")" ]; then no_ckpt=$((no_ckpt + 1))
  elif load_check "$run"; then loads_ok=$((loads_ok + 1)); else load_fail=$((load_fail + 1)); echo "kill $k: newest checkpoint does not load:"; tail -3 "$run/load.log"; fi
  echo "kill $k: newest checkpoint $(basename "$(latest "$run/checkpoints")" 2>/dev/null)"
  # A run that got to the end is started again from scratch, so every kill hits a live run.
  if [ -f "$run/checkpoints/step_$(printf %08d $steps)/state.json" ]; then rm -rf "$run"; fi
done
[ $delivered -ge $kills ] || load_fail=$((load_fail + 1))
check $load_fail "$delivered SIGKILLs into live runs ($in_ckpt during a checkpoint write, $done_early more attempts came after the run ended, $no_ckpt before the first checkpoint): newest checkpoint loaded $loads_ok times, failed $load_fail times"
"$flexcp" train "$cfg" "${common[@]}" --set logging.dir="$run" --set train.steps=$steps --resume >>"$run.log" 2>&1
check $? "resume to the end after the kills"
records "$run/metrics.jsonl" >"$work/killed.records"
cmp -s "$work/ref.records" "$work/killed.records"
check $? "metrics after $delivered kills equal the uninterrupted run ($(wc -l <"$work/ref.records") records, bit-exact)"
[ $? -eq 0 ] || diff "$work/ref.records" "$work/killed.records" | head
n=$(ls -d "$run"/checkpoints/step_* | wc -l)
[ "$n" -le $keep ]; check $? "keep_last=$keep: $n checkpoint folders remain"

# ---- 2a. file size limit: a checkpoint larger than ulimit -f
fs_run="$work/fsize"
"$flexcp" train "$cfg" "${common[@]}" --set logging.dir="$fs_run" --set train.steps=2 >"$fs_run.log" 2>&1
check $? "2 steps before the file size limit"
ck_bytes=$(stat -c %s "$fs_run/checkpoints/step_00000002/optimizer.safetensors")
( trap '' XFSZ; ulimit -f $((ck_bytes / 1024 / 2)); exec "$flexcp" train "$cfg" "${common[@]}" --set logging.dir="$fs_run" --set train.steps=4 --resume ) >"$fs_run.limit.log" 2>&1
rc=$?
[ $rc -eq 2 ] && grep -q "could not write the checkpoint" "$fs_run.limit.log" && grep -q "step_00000002) is intact" "$fs_run.limit.log"
check $? "file size limit during a checkpoint write: exit code $rc, message: $(tail -1 "$fs_run.limit.log" | cut -c1-200)"
[ "$(basename "$(latest "$fs_run/checkpoints")")" = step_00000002 ] && load_check "$fs_run" && ! compgen -G "$fs_run/checkpoints/*.partial" >/dev/null
check $? "after the failed write: step_00000002 is the newest checkpoint, loads, and no partial folder is left"

# ---- 2b. a full disk (tmpfs), when this process may mount one (root in CI)
disk_result="skipped (cannot mount a tmpfs)"
mnt="$work/tmpfs"
mkdir -p "$mnt"
if [ "$(id -u)" -eq 0 ] && mount -t tmpfs -o size=64m tmpfs "$mnt" 2>/dev/null; then
  umount "$mnt"
  one=$(du -sb "$fs_run/checkpoints/step_00000002" | cut -f1)
  # Room for one checkpoint and half of a second one.
  mount -t tmpfs -o size=$(( (one * 3 / 2 / 4096 + 4) * 4096 )) tmpfs "$mnt"
  cp -r "$fs_run/checkpoints/step_00000002" "$mnt/"
  full_run="$work/full"
  "$flexcp" train "$cfg" "${common[@]}" --set logging.dir="$full_run" --set checkpoint.dir="$mnt" --set checkpoint.keep_last=1 \
    --set train.steps=4 --resume >"$full_run.log" 2>&1
  rc=$?
  [ $rc -eq 2 ] && grep -q "No space left on device" "$full_run.log" && grep -q "step_00000002) is intact" "$full_run.log"
  check $? "full disk during a checkpoint write: exit code $rc, message: $(tail -1 "$full_run.log" | cut -c1-200)"
  [ "$(basename "$(latest "$mnt")")" = step_00000002 ] && ! compgen -G "$mnt/*.partial" >/dev/null &&
    "$flexcp" train "$cfg" "${common[@]}" --set logging.dir="$full_run" --set checkpoint.dir="$mnt" --set train.steps=2 --set train.warmup=0 --resume >/dev/null 2>&1
  r=$?
  check $r "after the full disk: step_00000002 is the newest checkpoint, loads, and no partial folder is left"
  disk_result=$([ $r -eq 0 ] && echo ok || echo FAILED)
  umount "$mnt"
fi
echo "full-disk test: $disk_result"

if [ -n "$report" ]; then
  printf '{"kills": %d, "kills_in_checkpoint_write": %d, "kills_after_end": %d, "kills_before_first_checkpoint": %d, "loads_ok": %d, "loads_failed": %d, "failures": %d, "run_seconds": "%s", "full_disk": "%s"}\n' \
    "$delivered" "$in_ckpt" "$done_early" "$no_ckpt" "$loads_ok" "$load_fail" "$failures" "$ref_s" "$disk_result" >"$report"
fi
if [ $failures -eq 0 ]; then rm -rf "$work"; echo "PASS"; exit 0; fi
echo "FAILED ($failures checks); files in $work"; exit 1
