# The benchmarks' Python, in one place: sourced by run_all.sh and gpu_smoke.sh (bash), from the
# repository root.
#
#   bench_python [dry]   sets PY to an interpreter with torch, megatron-core 0.19 and nemo_tst:
#                        $BENCH_PYTHON if set; else .venv/bin/python; else benchmarks/.venv;
#                        else one made here from the wheels in benchmarks/wheels, offline.
#                        With "dry", makes nothing and names what a real run would make.
#                        BENCH_SETUP says which route was taken. Returns 1 with no usable Python.
#
# A machine whose python3 has torch but no megatron-core (no internet) gets a venv of that
# python3 that sees its site-packages through a .pth file (a venv made from a venv would not)
# and this checkout through another; the wheels are installed into it with the base
# interpreter's pip, or, where it has no pip (or BENCH_NO_PIP=1), unpacked: a wheel is a zip
# archive of site-packages files. Where no venv can be made, the same goes into
# benchmarks/.pydeps, put on PYTHONPATH.
BENCH_MCORE="megatron-core==0.19.2"
BENCH_WHEELS="${BENCH_WHEELS:-benchmarks/wheels}"
BENCH_NEED='import torch, tokenizers, yaml, numpy, megatron.core, megatron.training, nemo_tst
from importlib.metadata import version
assert version("megatron-core").startswith("0.19."), version("megatron-core")'
BENCH_SETUP=""

bench_usable() { [ -n "$1" ] && [ -x "$1" ] && "$1" -c "$BENCH_NEED" >/dev/null 2>&1; }

bench_has_pip() {  # bench_has_pip PYTHON
  [ "${BENCH_NO_PIP:-0}" != 1 ] && "$1" -m pip --version >/dev/null 2>&1
}

bench_install_wheels() {  # bench_install_wheels BASE_PYTHON TARGET_DIR WHEEL...
  local base="$1" target="$2" whl
  shift 2
  mkdir -p "$target" || return 1
  if bench_has_pip "$base"; then
    BENCH_SETUP="${BENCH_SETUP:+$BENCH_SETUP, }wheels installed with pip"
    "$base" -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check \
      --upgrade --target "$target" "$@"
    return
  fi
  BENCH_SETUP="${BENCH_SETUP:+$BENCH_SETUP, }no pip: wheels unpacked"
  for whl in "$@"; do
    "$base" -m zipfile -e "$whl" "$target" || return 1
  done
  local d  # a wheel's NAME.data/purelib and platlib belong in site-packages itself
  for d in "$target"/*.data/purelib "$target"/*.data/platlib; do
    [ -d "$d" ] && { cp -r "$d"/. "$target"/ || return 1; }
  done
  return 0
}

bench_make_env() {
  local base="${BENCH_BASE_PYTHON:-python3}" venv=benchmarks/.venv deps=benchmarks/.pydeps site
  local repo="$PWD"
  if ! ls "$BENCH_WHEELS"/*.whl >/dev/null 2>&1; then
    echo "no usable Python and no wheels in $BENCH_WHEELS; run" >&2
    echo "  bash benchmarks/run_all.sh --fetch-wheels   (where there is internet)" >&2
    echo "and bring $BENCH_WHEELS to this machine" >&2
    return 1
  fi
  echo "[python] making a Python from $base and the wheels in $BENCH_WHEELS (offline)" >&2
  rm -rf "$venv"
  if "$base" -m venv --without-pip --system-site-packages "$venv" >/dev/null 2>&1; then
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || return 1
    # addsitedir, not bare paths: the base's own .pth files (editable installs, say) count too
    "$base" -c 'import site; print("\n".join(f"import site; site.addsitedir({p!r})" for p in site.getsitepackages()))' \
      > "$site/zz_base_site_packages.pth"
    echo "$repo" > "$site/nemo_tst_checkout.pth"
    BENCH_SETUP="venv of $base"
    bench_install_wheels "$base" "$site" "$BENCH_WHEELS"/*.whl || return 1
    PY="$venv/bin/python"
  else
    rm -rf "$venv" "$deps"
    BENCH_SETUP="no venv: $base with $deps on PYTHONPATH"
    bench_install_wheels "$base" "$deps" "$BENCH_WHEELS"/*.whl || return 1
    export PYTHONPATH="$repo/$deps:$repo${PYTHONPATH:+:$PYTHONPATH}"
    PY="$base"
  fi
}

bench_python() {  # bench_python [dry]
  local cand base="${BENCH_BASE_PYTHON:-python3}"
  PY=""
  for cand in "${BENCH_PYTHON:-}" .venv/bin/python benchmarks/.venv/bin/python; do
    if bench_usable "$cand"; then PY="$cand"; BENCH_SETUP="${BENCH_SETUP:-found $cand}"; return 0; fi
  done
  if [ -d benchmarks/.pydeps ] && PYTHONPATH="$PWD/benchmarks/.pydeps:$PWD${PYTHONPATH:+:$PYTHONPATH}" \
      bench_usable "$(command -v "$base")"; then
    export PYTHONPATH="$PWD/benchmarks/.pydeps:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    PY="$base"; BENCH_SETUP="found $base with benchmarks/.pydeps"; return 0
  fi
  if [ "${1:-}" = dry ]; then
    PY=benchmarks/.venv/bin/python
    if bench_has_pip "$base"; then how="installing them with its pip"; else how="unpacking them (no pip)"; fi
    BENCH_SETUP="dry run: would make $PY from $base and $BENCH_WHEELS, $how"
    echo "[dry-run] no usable Python here: a real run would make $PY from $base and the wheels in $BENCH_WHEELS, $how"
    return 0
  fi
  bench_make_env && bench_usable "$(command -v "$PY" || echo "$PY")" && return 0
  echo "no Python with torch, megatron-core 0.19 and nemo_tst; tried \$BENCH_PYTHON, .venv," \
       "benchmarks/.venv and one made from $BENCH_WHEELS. The check was:" >&2
  "${PY:-${BENCH_PYTHON:-$base}}" -c "$BENCH_NEED" || true
  PY=""
  return 1
}
