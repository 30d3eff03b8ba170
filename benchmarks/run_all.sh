#!/usr/bin/env bash
# The four benchmarks in one command; JSON, PNG, results.md and logs.tar.gz land in OUTDIR.
#
#   bash benchmarks/run_all.sh [--cpu-smoke] [--only LIST] [--quality-minutes M] [OUTDIR]
#   bash benchmarks/run_all.sh --fetch-wheels      # once, where there is internet (see below)
#
# OUTDIR   default: $OUT when set (the device machine's output folder), else
#          benchmarks/results/<date-time>. Large files (data, checkpoints) go to
#          ${BENCH_WORK:-benchmarks/work}, never to OUTDIR.
# LIST     comma-separated, from: loss, step, throughput, quality-prep, quality
#          (default: loss,step,throughput,quality). quality-prep builds the corpus and
#          calibrates N for a later `--only quality` call on the same machine.
# --quality-minutes M   wall-clock budget of quality.py (default 8; the runs are sized to it,
#                       and it returns within M + 1.5 minutes)
# --cpu-smoke           tiny sizes on CPU: checks that everything runs, measures nothing real
#
# Python: $BENCH_PYTHON if set; else .venv/bin/python when it has torch, megatron-core 0.19
# and nemo_tst; else benchmarks/.venv, created here from local wheels only (no index, no
# network). That is the device machine's case: it has no internet, and its python3
# (/opt/torch/.venv) already holds torch, triton, numpy, tokenizers, pyyaml, psutil and
# matplotlib, but not megatron-core. `--fetch-wheels` downloads the megatron-core 0.19.2 wheel
# into benchmarks/wheels (git-ignored); the device call carries that folder
# (carry: ["benchmarks/wheels"]). The venv sees the base interpreter's site-packages through a
# .pth file (a venv made from a venv would not) and this checkout through another.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
MCORE="megatron-core==0.19.2"

mode=gpu
only="loss,step,throughput,quality"
quality_minutes=8
out=""
args_seen="$*"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) mode=cpu; shift ;;
    --only) only="$2"; shift 2 ;;
    --quality-minutes) quality_minutes="$2"; shift 2 ;;
    --fetch-wheels)
      py="python3"; [ -x .venv/bin/python ] && py=.venv/bin/python
      mkdir -p benchmarks/wheels
      exec "$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d benchmarks/wheels "$MCORE" ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "run_all.sh: unknown option $1" >&2; exit 2 ;;
    *) out="$1"; shift ;;
  esac
done
out="${out:-${OUT:-benchmarks/results/$(date +%Y%m%d-%H%M%S)}}"
work="${BENCH_WORK:-benchmarks/work}"
mkdir -p "$out" "$work"
out="$(cd "$out" && pwd)"
logs="$out/logs"
mkdir -p "$logs"

# ----- Python ----------------------------------------------------------------------------------
need='import torch, tokenizers, yaml, numpy, megatron.core, megatron.training, nemo_tst
from importlib.metadata import version
assert version("megatron-core").startswith("0.19."), version("megatron-core")'
usable() { [ -n "$1" ] && [ -x "$1" ] && "$1" -c "$need" >/dev/null 2>&1; }

make_venv() {
  local base="${BENCH_BASE_PYTHON:-python3}" venv=benchmarks/.venv site
  if ! ls benchmarks/wheels/*.whl >/dev/null 2>&1; then
    echo "run_all.sh: no usable Python and no wheels in benchmarks/wheels; run" >&2
    echo "  bash benchmarks/run_all.sh --fetch-wheels   (where there is internet)" >&2
    echo "and carry benchmarks/wheels to this machine" >&2
    return 1
  fi
  echo "[run_all] creating $venv from $base and the wheels in benchmarks/wheels (offline)" >&2
  rm -rf "$venv"
  "$base" -m venv --without-pip --system-site-packages "$venv" || return 1
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  "$base" -c 'import site; print("\n".join(site.getsitepackages()))' > "$site/zz_base_site_packages.pth"
  echo "$REPO" > "$site/nemo_tst_checkout.pth"
  "$base" -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check \
    --target "$site" benchmarks/wheels/*.whl || return 1
}

PY=""
for cand in "${BENCH_PYTHON:-}" .venv/bin/python benchmarks/.venv/bin/python; do
  if usable "$cand"; then PY="$cand"; break; fi
done
if [ -z "$PY" ]; then
  make_venv && usable benchmarks/.venv/bin/python && PY=benchmarks/.venv/bin/python
fi
if [ -z "$PY" ]; then
  echo "run_all.sh: no Python with torch, megatron-core 0.19 and nemo_tst; tried" \
       "\$BENCH_PYTHON, .venv, benchmarks/.venv. The check was:" >&2
  "${BENCH_PYTHON:-benchmarks/.venv/bin/python}" -c "$need" || true
  exit 1
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS="ignore::UserWarning,ignore::FutureWarning"

{
  echo "[run_all] $(date '+%F %T') mode=$mode only=$only out=$out python=$PY"
  "$PY" - <<'PYEOF'
import sys, torch
from importlib.metadata import version
print(f"[run_all] python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"megatron-core {version('megatron-core')}, CUDA available: {torch.cuda.is_available()}")
PYEOF
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
} 2>&1 | tee "$logs/environment.log"

# ----- the benchmarks --------------------------------------------------------------------------
summary=()
bench() {  # bench NAME SECONDS command...
  local name="$1" limit="$2"; shift 2
  case ",$only," in *",$name,"*) ;; *) return 0 ;; esac
  echo; echo "[run_all] == $name (limit ${limit}s): $*"
  local t0=$SECONDS rc
  timeout --signal=TERM --kill-after=60 "$limit" "$@" 2>&1 | tee "$logs/$name.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && rc="124 (timed out)"
  summary+=("$name: exit $rc after $((SECONDS - t0)) s")
  echo "[run_all] == $name: exit $rc after $((SECONDS - t0)) s"
}

if [ "$mode" = cpu ]; then
  dev=(--device cpu)
  qargs=(--size cpu-smoke --baseline-multipliers 1.5 --budget-minutes 6 --work-dir "$work/smoke")
  t_loss=240; t_step=240; t_tp=240; t_qprep=300; t_q=480
else
  dev=(--device cuda)
  qargs=(--budget-minutes "$quality_minutes" --work-dir "$work/quality")
  t_loss=180; t_step=180; t_tp=240; t_qprep=420; t_q=$(awk "BEGIN{print int($quality_minutes*60+90)}")
fi

bench loss "$t_loss" "$PY" benchmarks/loss_microbench.py "${dev[@]}" --out "$out/loss_microbench.json"
bench step "$t_step" "$PY" benchmarks/step_overhead.py "${dev[@]}" --out "$out/step_overhead.json"
bench throughput "$t_tp" "$PY" benchmarks/throughput.py "${dev[@]}" --out "$out/throughput.json"
bench quality-prep "$t_qprep" "$PY" benchmarks/quality.py "${dev[@]}" "${qargs[@]}" --prepare-only \
  --out "$out/quality.json"
bench quality "$t_q" "$PY" benchmarks/quality.py "${dev[@]}" "${qargs[@]}" --out "$out/quality.json"

# ----- report and logs -------------------------------------------------------------------------
echo
"$PY" benchmarks/report.py "$out" --out "$out/results.md" --command "bash benchmarks/run_all.sh $args_seen" \
  2>&1 | tee -a "$logs/report.log"
{
  echo; echo "## Run"; echo
  for line in "${summary[@]}"; do echo "- $line"; done
} >> "$out/results.md"
# Per-run trainer logs of quality.py, then everything into one archive (the device machine
# returns at most 8 files from OUTDIR).
for d in "$work"/quality/N* "$work"/smoke/N*; do
  [ -d "$d" ] || continue
  for r in "$d"/*/; do
    [ -f "$r/train.log" ] && mkdir -p "$logs/quality_runs" && \
      cp "$r/train.log" "$logs/quality_runs/$(basename "$d")_$(basename "$r").log"
  done
done
tar -czf "$out/logs.tar.gz" -C "$out" logs && rm -rf "$logs"
echo "[run_all] done: $out"
ls -la "$out"
for line in "${summary[@]}"; do echo "[run_all] $line"; done
