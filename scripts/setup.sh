#!/usr/bin/env bash
# Create (or reuse) the project's Python 3.12 virtual environment in .venv and install nemo-tst
# into it with the given extras. Finds python3.12 on PATH, or under pyenv, or fails saying how
# to get one. Usage: scripts/setup.sh [extras]   (default extras: test; e.g. "test,bridge")
# With the `bridge` extra it also installs Megatron-Bridge (see install_bridge below).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
venv="${NEMO_TST_VENV:-.venv}"

# The Megatron-Bridge release the adapter is tested against (nemo_tst/bridge/checks.py) and the
# nvidia-resiliency-ext that megatron-core 0.19 accepts (it asserts >= 0.6.0 at import).
BRIDGE_VERSION=0.6.2
NVRX_VERSION=0.6.0

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

# Megatron-Bridge without its declared dependencies, whose closure cannot install here: it
# includes sdists that need CUDA to build (fast-hadamard-transform) and nvidia-resiliency-ext,
# which pip resolves to 0.4.1 on glibc < 2.39 (0.5 and later ship only manylinux_2_39 wheels)
# and megatron-core 0.19 then fails to import. The packages Bridge's pretraining path does
# import come from the `bridge` extra. nvidia-resiliency-ext 0.6.0's Python code is
# platform-independent; its one native module (CUPTI straggler attribution, off unless
# cfg.nvrx_straggler is set) needs glibc 2.39, so its wheel is unpacked with pip's --target and
# --platform, pinned to that version, rather than resolved.
install_bridge() {
  local py="$venv/bin/python" pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
  "${pip[@]}" --no-deps "megatron-bridge==$BRIDGE_VERSION"
  if [ "$("$py" -c 'import importlib.metadata as m; print(m.version("nvidia-resiliency-ext"))' 2>/dev/null)" != "$NVRX_VERSION" ]; then
    local site tmp
    site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    tmp="$(mktemp -d)"
    "$py" -m pip uninstall --quiet --yes nvidia-resiliency-ext >/dev/null 2>&1 || true
    "${pip[@]}" --no-deps --only-binary=:all: --platform "manylinux_2_39_$(uname -m)" \
      --python-version 3.12 --implementation cp --abi cp312 --target "$tmp" \
      "nvidia-resiliency-ext==$NVRX_VERSION"
    rm -rf "$tmp/bin"  # its console scripts (ft_launcher) are not used
    rm -rf "$site"/nvidia_resiliency_ext "$site"/nvidia_resiliency_ext-*.dist-info
    mv "$tmp"/* "$site"/
    rm -rf "$tmp"
  fi
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
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
  echo "[setup] installing nemo-tst[$extras] into $venv (torch is several GB the first time)" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[$extras]"
  if [[ ",$extras," == *",bridge,"* ]]; then
    echo "[setup] installing megatron-bridge==$BRIDGE_VERSION (see install_bridge)" >&2
    install_bridge
  fi
  touch "$stamp"
fi
