#!/usr/bin/env bash
# Set up the environment, lint, and run the test suite (what CI runs). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,bridge
# Lint first: an unused import or an undefined name fails in seconds, before the tests run
# (rules in pyproject.toml, [tool.ruff]).
.venv/bin/python -m ruff check --quiet .
set +e
.venv/bin/python -m pytest tests "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests; that is a failure here, not a pass" >&2
  exit 1
fi
exit "$rc"
