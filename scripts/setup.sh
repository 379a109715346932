#!/usr/bin/env bash
# Creates .venv (if missing) and installs vaelab into it with the exact versions of constraints.txt
# (torch 2.13.0 among them: the CPU wheel on this project's machines).
# Usage: bash scripts/setup.sh [EXTRAS]   e.g. "test"
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=".venv/.vaelab-installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # pyproject.toml asks for a range of torch (and of everything else); constraints.txt pins the
  # versions these commands install, so every fresh machine gets the same environment. Which build
  # of torch 2.13.0 pip picks is the index's choice: this project's machines offer the CPU wheel;
  # plain PyPI on Linux gives the CUDA build (GBs). A .venv that already holds torch 2.13.0+cpu keeps it.
  .venv/bin/python -m pip install -q -c constraints.txt -e ".${extras:+[$extras]}"
  touch "$stamp"
fi
