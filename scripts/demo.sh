#!/usr/bin/env bash
# Set up the environment and run the main job: a baseline and a two-phase TST run on the
# built-in corpus (the Python standard library's sources), on CPU when there is no GPU.
# Extra args go to `nemo-tst demo` (e.g. --out runs/demo, --bag-size 4, --phase1-fraction 0.3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/nemo-tst demo "$@"
