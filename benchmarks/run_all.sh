#!/usr/bin/env bash
# The four benchmarks in one command; JSON, PNG, results.md and logs.tar.gz land in OUTDIR.
#
#   bash benchmarks/run_all.sh [--cpu-smoke] [--only LIST] [--quality-minutes M] [OUTDIR]
#   bash benchmarks/run_all.sh --gpu-window [--cpu-smoke] [--dry-run] [OUTDIR]
#   bash benchmarks/run_all.sh --fetch-wheels      # once, where there is internet (see below)
#
# OUTDIR   default: $OUT when set (the device machine's output folder), else
#          benchmarks/results/<date-time>. Large files (data, checkpoints, the logs until they
#          are archived) go to ${BENCH_WORK:-benchmarks/work}, never to OUTDIR.
# LIST     comma-separated, from: loss, step, throughput, quality-prep, quality
#          (default: loss,step,throughput,quality). quality-prep builds the corpus and
#          calibrates N for a later `--only quality` call on the same machine.
# --quality-minutes M   wall-clock budget of quality.py (default 8; the runs are sized to it,
#                       and it returns within M + 1.5 minutes)
# --gpu-window          everything in ONE device call: a hard deadline of $BENCH_WINDOW_SECONDS
#                       (540 = 9 minutes) from this script's start, the Python set-up included;
#                       the three microbenchmarks, then baseline vs TST (s = BEST_S, r = 0.3) with
#                       the largest N that the time left allows. The quality data are built on
#                       the CPU beside the microbenchmarks. results.md and logs.tar.gz are
#                       rewritten after every part, so a time-out still leaves numbers.
# --cpu-smoke           tiny sizes on CPU: checks that everything runs, measures nothing real
#                       (with --gpu-window: the window's schedule on CPU, a 420 s window)
# --dry-run             print the plan (parts, time limits, commands) and run nothing
#
# Python: $BENCH_PYTHON if set; else .venv/bin/python when it has torch, megatron-core 0.19
# and nemo_tst; else benchmarks/.venv, created here from local wheels only (no index, no
# network). That is the device machine's case: it has no internet, and its python3
# (/opt/torch/.venv) already holds torch, triton, numpy, tokenizers, pyyaml, psutil and
# matplotlib, but not megatron-core. `--fetch-wheels` downloads the megatron-core 0.19.2 wheel
# into benchmarks/wheels (git-ignored); the device call carries that folder
# (carry: ["benchmarks/wheels"]). The venv sees the base interpreter's site-packages through a
# .pth file (a venv made from a venv would not) and this checkout through another; the wheel is
# installed with the base interpreter's pip, or unpacked where it has none
# (benchmarks/python_env.sh, shared with gpu_smoke.sh).
set -uo pipefail
SECONDS=0  # the window's clock: the Python set-up counts
cd "$(dirname "$0")/.."
REPO="$PWD"
. benchmarks/python_env.sh  # BENCH_MCORE, bench_python (sets PY)

# ----- the GPU window (--gpu-window) -----------------------------------------------------------
# TST's s and r in the window's quality comparison: the best measured so far (docs/benchmarks.md,
# CPU, N = 3,000: s=2 r=0.2 -0.048 nats, s=2 r=0.3 -0.041, s=4 r=0.3 +0.040 against the
# baseline). BENCH_BEST_S / BENCH_WINDOW_R override them.
BEST_S="${BENCH_BEST_S:-2}"
WINDOW_R="${BENCH_WINDOW_R:-0.2}"
# Seconds, counted from this script's start. Caps are hard limits (timeout); "expect" is what
# each part should take on an H200-class GPU (estimated from the H100 numbers; see README.md).
W_END=20          # kept for the report and the logs archive after the last part
W_QUALITY_MIN=180 # the quality part starts only with at least this much left (else skipped)
W_QUALITY_TAIL=25 # quality.py's own end after its deadline (logs read, table, plot)
W_REFRESH=10      # results.md and logs.tar.gz after each microbenchmark (a second or two)
W_RESERVE=60      # quality.py --reserve-seconds: budget left unplanned when N is chosen. Megatron's
                  # --exit-duration-in-mins takes whole minutes and quality.py rounds the time
                  # left down, so a phase may be stopped up to 59 s before quality.py's deadline
W_CAP_LOSS=120 W_CAP_STEP=120 W_CAP_TP=150       # caps of the microbenchmarks
declare -A EXPECT=([setup]=20 [loss]=45 [step]=45 [throughput]=60 [quality-data]=120 [quality]=330)

mode=gpu
window=0
dry=0
only="loss,step,throughput,quality"
quality_minutes=8
out=""
args_seen="$*"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) mode=cpu; shift ;;
    --gpu-window) window=1; shift ;;
    --dry-run) dry=1; shift ;;
    --only) only="$2"; shift 2 ;;
    --quality-minutes) quality_minutes="$2"; shift 2 ;;
    --fetch-wheels)
      py="python3"; [ -x .venv/bin/python ] && py=.venv/bin/python
      mkdir -p benchmarks/wheels
      exec "$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d benchmarks/wheels "$BENCH_MCORE" ;;
    -h|--help) sed -n '2,33p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "run_all.sh: unknown option $1" >&2; exit 2 ;;
    *) out="$1"; shift ;;
  esac
done
if [ "$window" = 1 ]; then
  case ",$only," in *",quality-prep,"*) echo "run_all.sh: --gpu-window has no quality-prep part" >&2; exit 2 ;; esac
  if [ "$mode" = cpu ]; then  # the same schedule on CPU, scaled to tiny sizes: wiring only
    WINDOW_SECONDS="${BENCH_WINDOW_SECONDS:-420}"
    W_END=10 W_QUALITY_MIN=100 W_QUALITY_TAIL=15 W_RESERVE=30
    W_CAP_LOSS=90 W_CAP_STEP=90 W_CAP_TP=90
    EXPECT=([setup]=10 [loss]=25 [step]=25 [throughput]=30 [quality-data]=40 [quality]=110)
  else
    WINDOW_SECONDS="${BENCH_WINDOW_SECONDS:-540}"
  fi
fi
out="${out:-${OUT:-benchmarks/results/$(date +%Y%m%d-%H%M%S)}}"
work="${BENCH_WORK:-benchmarks/work}"
mkdir -p "$out" "$work"
out="$(cd "$out" && pwd)"
work="$(cd "$work" && pwd)"
# Logs are written outside OUTDIR and archived into it after each part (the device machine
# returns at most 8 files from OUTDIR, so OUTDIR never holds a folder of logs).
logroot="$(mktemp -d "$work/run_all_logs.XXXXXX")"
logs="$logroot/logs"
mkdir -p "$logs"

# A virtual clock for --dry-run: each part "takes" its expected time.
vclock=0
now() { echo $(( SECONDS + vclock )); }
left() { echo $(( WINDOW_SECONDS - $(now) )); }

# ----- Python (benchmarks/python_env.sh, shared with gpu_smoke.sh) ------------------------------
if [ "$dry" = 1 ]; then
  bench_python dry
else
  bench_python || { echo "run_all.sh: no usable Python (see above)" >&2; exit 1; }
fi
echo "[run_all] python: $PY ($BENCH_SETUP)"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS="ignore::UserWarning,ignore::FutureWarning"

summary=()
if [ "$dry" = 1 ]; then
  vclock=$(( ${EXPECT[setup]} - SECONDS ))
  [ "$vclock" -lt 0 ] && vclock=0
else
  {
    echo "[run_all] $(date '+%F %T') mode=$mode window=$window only=$only out=$out python=$PY"
    "$PY" - <<'PYEOF'
import sys, torch
from importlib.metadata import version
print(f"[run_all] python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"megatron-core {version('megatron-core')}, CUDA available: {torch.cuda.is_available()}")
PYEOF
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  } 2>&1 | tee "$logs/environment.log"
fi
summary+=("set-up (Python, environment record): $(now) s")
if [ "$window" = 1 ]; then
  echo "[run_all] window: ${WINDOW_SECONDS} s from the start, $(now) s used by the set-up;" \
       "quality: baseline vs TST s=$BEST_S r=$WINDOW_R"
fi

# ----- outputs, refreshed after every part -----------------------------------------------------
qwork=""
refresh() {  # results.md and logs.tar.gz from what exists now, so that a later time-out keeps them
  [ "$dry" = 1 ] && return 0
  if ! "$PY" benchmarks/report.py "$out" --out "$out/results.md" \
        --command "bash benchmarks/run_all.sh $args_seen" >> "$logs/report.log" 2>&1; then
    printf '# nemo-tst benchmarks\n\nno benchmark has written its results yet\n' > "$out/results.md"
  fi
  {
    echo; echo "## Run"; echo
    [ "$window" = 1 ] && echo "- window: ${WINDOW_SECONDS} s (hard deadline from the start, set-up included); quality: baseline vs TST s=$BEST_S, r=$WINDOW_R"
    for line in "${summary[@]}"; do echo "- $line"; done
  } >> "$out/results.md"
  # Per-run trainer logs of quality.py (calibration included).
  if [ -n "$qwork" ]; then
    for r in "$qwork"/N*/*/ "$qwork"/calibrate_*/; do
      [ -f "$r/train.log" ] || continue
      mkdir -p "$logs/quality_runs"
      cp "$r/train.log" "$logs/quality_runs/$(basename "$(dirname "$r")")_$(basename "$r").log"
    done
  fi
  tar -czf "$logroot/logs.tar.gz" -C "$logroot" logs && mv -f "$logroot/logs.tar.gz" "$out/logs.tar.gz"
}

# ----- the benchmarks --------------------------------------------------------------------------
selected() { case ",$only," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
kill_after=60
[ "$window" = 1 ] && kill_after=15  # inside W_END: quality.py stops its runs on TERM
bench() {  # bench NAME SECONDS command...
  local name="$1" limit="$2"; shift 2
  selected "$name" || return 0
  if [ "$limit" -lt 5 ]; then skip "$name" "no time left in the window (${limit} s)"; return 0; fi
  echo; echo "[run_all] == $name at $(now) s (limit ${limit}s): $*"
  if [ "$dry" = 1 ]; then
    vclock=$(( vclock + ${EXPECT[$name]} ))
    summary+=("$name: dry run, limit ${limit} s, expected ${EXPECT[$name]} s")
    return 0
  fi
  local t0=$SECONDS rc
  timeout --signal=TERM --kill-after="$kill_after" "$limit" "$@" 2>&1 | tee "$logs/$name.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && rc="124 (timed out)"
  summary+=("$name: exit $rc after $((SECONDS - t0)) s (limit $limit s, ended at $SECONDS s)")
  echo "[run_all] == $name: exit $rc after $((SECONDS - t0)) s"
  refresh
}
skip() {  # skip NAME why
  selected "$1" || return 0
  summary+=("$1: skipped, $2")
  echo "[run_all] == $1: skipped, $2"
  refresh
}
# window: a part's limit is its cap, or less when the parts after it need the time
wlimit() {  # wlimit CAP KEEP -> seconds
  local l=$(( $(left) - $2 ))
  [ "$l" -gt "$1" ] && l="$1"
  echo "$l"
}

if [ "$window" = 1 ]; then
  keep=$W_END
  selected quality && keep=$(( W_END + W_QUALITY_MIN + W_REFRESH ))
  if [ "$mode" = cpu ]; then
    dev=(--device cpu)
    loss_args=(--tokens 64 --vocab 512 --bag-sizes 4 --warmup 1 --iters 3)
    step_args=(--rounds 1 --steps-per-round 2 --warmup 1)
    tp_args=(--iters 2 --warmup 1)
    qsize=(--size cpu-smoke --seeds 2)
  else
    dev=(--device cuda)
    loss_args=() step_args=() tp_args=()
    qsize=(--size budget)
  fi
  qwork="$work/window_$( [ "$mode" = cpu ] && echo cpu || echo gpu )"
  # The corpus, BPE and indexed datasets need no GPU: built beside the microbenchmarks, niced,
  # off the first two cores (where the microbenchmarks' launching thread runs).
  data_pid=""
  if selected quality; then
    pin=()
    ncpu="$(nproc 2>/dev/null || echo 1)"
    command -v taskset >/dev/null && [ "$ncpu" -ge 4 ] && pin=(taskset -c "2-$(( ncpu - 1 ))")
    data_cmd=("$PY" benchmarks/quality.py --device cpu "${qsize[@]}" --data-only --work-dir "$qwork")
    data_limit=$(( $(left) - keep ))
    echo; echo "[run_all] == quality-data at $(now) s, in the background (limit ${data_limit}s): ${data_cmd[*]}"
    if [ "$dry" = 1 ]; then
      summary+=("quality-data: dry run, beside the microbenchmarks, expected ${EXPECT[quality-data]} s")
    else
      (
        t0=$SECONDS
        timeout --signal=TERM --kill-after=5 "$data_limit" nice -n 19 "${pin[@]}" "${data_cmd[@]}" \
          > "$logs/quality-data.log" 2>&1
        echo "$? $((SECONDS - t0))" > "$logroot/quality-data.rc"
      ) &
      data_pid=$!
    fi
  fi
  bench loss "$(wlimit "$W_CAP_LOSS" "$keep")" "$PY" benchmarks/loss_microbench.py "${dev[@]}" "${loss_args[@]}" \
    --out "$out/loss_microbench.json"
  bench step "$(wlimit "$W_CAP_STEP" "$keep")" "$PY" benchmarks/step_overhead.py "${dev[@]}" "${step_args[@]}" \
    --out "$out/step_overhead.json"
  bench throughput "$(wlimit "$W_CAP_TP" "$keep")" "$PY" benchmarks/throughput.py "${dev[@]}" "${tp_args[@]}" \
    --out "$out/throughput.json"
  if [ -n "$data_pid" ]; then
    echo "[run_all] waiting for the quality data at $(now) s"
    wait "$data_pid"
    read -r drc dsec < "$logroot/quality-data.rc" || { drc="?"; dsec="?"; }
    [ "$drc" = 124 ] && drc="124 (timed out; quality.py prepares what is missing itself)"
    summary+=("quality-data (beside the microbenchmarks): exit $drc after $dsec s, ready at $SECONDS s")
    echo "[run_all] == quality-data: exit $drc after $dsec s"
  fi
  if selected quality; then
    budget=$(( $(left) - W_END - W_QUALITY_TAIL ))
    if [ $(( $(left) - W_END )) -lt "$W_QUALITY_MIN" ]; then
      skip quality "only $(left) s of the window left (needs $W_QUALITY_MIN s + $W_END s for the report)"
    else
      minutes="$(awk "BEGIN{printf \"%.2f\", $budget / 60}")"
      EXPECT[quality]=$budget  # for --dry-run: N is sized to the budget
      bench quality "$(( $(left) - W_END ))" "$PY" benchmarks/quality.py "${dev[@]}" "${qsize[@]}" \
        --bag-size "$BEST_S" --phase1-fraction "$WINDOW_R" --baseline-multipliers \
        --budget-minutes "$minutes" --reserve-seconds "$W_RESERVE" --work-dir "$qwork" \
        --out "$out/quality.json"
    fi
  fi
else
  if [ "$mode" = cpu ]; then
    dev=(--device cpu)
    qwork="$work/smoke"
    qargs=(--size cpu-smoke --baseline-multipliers 1.5 --budget-minutes 6 --work-dir "$qwork")
    t_loss=240; t_step=240; t_tp=240; t_qprep=300; t_q=480
  else
    dev=(--device cuda)
    qwork="$work/quality"
    qargs=(--budget-minutes "$quality_minutes" --work-dir "$qwork")
    t_loss=180; t_step=180; t_tp=240; t_qprep=420; t_q=$(awk "BEGIN{print int($quality_minutes*60+90)}")
  fi
  EXPECT+=([quality-prep]=$t_qprep)
  bench loss "$t_loss" "$PY" benchmarks/loss_microbench.py "${dev[@]}" --out "$out/loss_microbench.json"
  bench step "$t_step" "$PY" benchmarks/step_overhead.py "${dev[@]}" --out "$out/step_overhead.json"
  bench throughput "$t_tp" "$PY" benchmarks/throughput.py "${dev[@]}" --out "$out/throughput.json"
  bench quality-prep "$t_qprep" "$PY" benchmarks/quality.py "${dev[@]}" "${qargs[@]}" --prepare-only \
    --out "$out/quality.json"
  bench quality "$t_q" "$PY" benchmarks/quality.py "${dev[@]}" "${qargs[@]}" --out "$out/quality.json"
fi

# ----- report and logs -------------------------------------------------------------------------
summary+=("total: $(now) s$( [ "$window" = 1 ] && echo " of the ${WINDOW_SECONDS} s window")")
echo
if [ "$dry" = 1 ]; then
  echo "[dry-run] nothing was run; OUTDIR would be $out"
  for line in "${summary[@]}"; do echo "[run_all] $line"; done
  rm -rf "$logroot"
  exit 0
fi
refresh
cat "$logs/report.log" 2>/dev/null | tail -n 3
rm -rf "$logroot"
echo "[run_all] done: $out"
ls -la "$out"
for line in "${summary[@]}"; do echo "[run_all] $line"; done
