#!/usr/bin/env bash
# The quick-start demo on a fresh machine: installs the project into .venv,
# then runs `mesh demo` (3 local peers on SQLite, one killed mid-run, its runs
# finishing elsewhere). Extra arguments go to `mesh demo`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ ! -x .venv/bin/python ]; then
  echo "[demo.sh] creating .venv" >&2
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet -c constraints.txt -e '.[test]'
exec .venv/bin/mesh demo "$@"
