#!/usr/bin/env bash
# The main job on a fresh machine: set up, fetch MNIST, train the seed VAE (the Keras example),
# and write its figures and report into runs/seed (runs/seed-2, ... if that exists).
# Extra arguments go to `vaelab train`, e.g.  bash run.sh --epochs 5
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
.venv/bin/vaelab data fetch mnist
exec .venv/bin/vaelab train "$@"
