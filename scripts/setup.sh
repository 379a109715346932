#!/usr/bin/env bash
# Creates .venv (if missing) and installs vaelab into it, with the pinned CPU torch.
# Usage: bash scripts/setup.sh [EXTRAS]   e.g. "test"
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=".venv/.vaelab-installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch is pinned (torch==2.13.0) in pyproject.toml. Which build pip picks is the index's choice:
  # this project's machines offer the CPU wheel; plain PyPI on Linux gives the CUDA build (GBs).
  # A .venv that already holds torch 2.13.0+cpu keeps it (see the README).
  .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
  touch "$stamp"
fi
