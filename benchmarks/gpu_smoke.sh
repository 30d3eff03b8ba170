#!/usr/bin/env bash
# The GPU smoke check in one command: about 5 minutes on one H200-class GPU, the Python set-up
# included (the clock starts here). What it runs: benchmarks/gpu_smoke.py (--help).
#
#   bash benchmarks/gpu_smoke.sh [--dry-run] [gpu_smoke.py options]
#
# Python: the same as run_all.sh (benchmarks/python_env.sh): a Python with megatron-core 0.19,
# else one made from the wheel in benchmarks/wheels (`bash benchmarks/run_all.sh
# --fetch-wheels` where there is internet), with pip or, without it, by unpacking the wheel.
# Where none can be made, the check still runs on the base python3 and records why in its JSON.
# --dry-run   print the plan (steps, commands, time limits), run the environment probe, write
#             the JSON; makes no Python and runs nothing else (a CPU check)
# Results: $OUT/gpu_smoke.json when OUT is set, else benchmarks/results/gpu_smoke-<date>.json.
set -uo pipefail
export GPU_SMOKE_START="${GPU_SMOKE_START:-$(date +%s)}"
cd "$(dirname "$0")/.."
case " $* " in *" -h "*|*" --help "*) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
. benchmarks/python_env.sh
base="${BENCH_BASE_PYTHON:-python3}"
dry=0
case " $* " in *" --dry-run "*) dry=1 ;; esac
if [ "$dry" = 1 ]; then
  bench_python dry
else
  bench_python || BENCH_SETUP="no usable Python could be made (see above); running on $base"
fi
if [ "$dry" = 1 ] || [ -z "$PY" ] || ! [ -x "$(command -v "$PY")" ]; then
  bench_usable "$(command -v "$PY" 2>/dev/null)" || PY="$(command -v "$base")"
fi
export BENCH_SETUP BENCH_BASE_PYTHON="$base" PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "[gpu_smoke] python: $PY ($BENCH_SETUP), set-up $(( $(date +%s) - GPU_SMOKE_START )) s"
exec "$PY" benchmarks/gpu_smoke.py "$@"
