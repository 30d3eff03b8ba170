#!/usr/bin/env bash
# Create (or reuse) the project's Python 3.12 virtual environment in .venv and install nemo-tst
# into it with the given extras. Finds python3.12 on PATH, or under pyenv, or fails saying how
# to get one. Usage: scripts/setup.sh [extras]   (default extras: test)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
venv="${NEMO_TST_VENV:-.venv}"

find_python312() {
  local cand
  for cand in python3.12 python3 python; do
    if command -v "$cand" >/dev/null 2>&1 &&
       "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; then
      command -v "$cand"; return 0
    fi
  done
  # pyenv's python3.12 shim refuses to run unless 3.12 is selected: use the install directly.
  local root
  root="$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"
  for cand in "$root"/versions/3.12*/bin/python3.12; do
    if [ -x "$cand" ] && "$cand" -c 'import sys' >/dev/null 2>&1; then
      echo "$cand"; return 0
    fi
  done
  return 1
}

if [ ! -x "$venv/bin/python" ]; then
  if ! py="$(find_python312)"; then
    echo "error: nemo-tst needs Python 3.12 (megatron-core >= 0.17 requires it) and none was" >&2
    echo "found on PATH or under pyenv. Install one (e.g. 'pyenv install 3.12') and rerun." >&2
    exit 1
  fi
  echo "[setup] creating $venv with $py" >&2
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
fi

stamp="$venv/.nemo-tst-installed-$extras"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing nemo-tst[$extras] into $venv (torch is several GB the first time)" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[$extras]"
  touch "$stamp"
fi
