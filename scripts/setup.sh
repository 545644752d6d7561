#!/usr/bin/env bash
# Create .venv with Python >= 3.12 and install aistats (and, with --test, what the tests need:
# Python test packages, and Debian's prometheus and chromium when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  for c in python3.13 python3.12 "$HOME"/.pyenv/versions/3.12.*/bin/python3.12 \
           "$HOME"/.pyenv/versions/3.13.*/bin/python3.13; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
      echo "$c"; return 0
    fi
  done
  return 1
}

if [ ! -x .venv/bin/python ]; then
  PY=$(find_python) || { echo "setup.sh: no Python >= 3.12 found (looked on PATH and in ~/.pyenv)" >&2; exit 1; }
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || true
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q -e '.[test]'
  if [ -x scripts/setup-system.sh ]; then bash scripts/setup-system.sh; fi
else
  .venv/bin/python -m pip install -q -e .
fi
