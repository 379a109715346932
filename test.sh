#!/usr/bin/env bash
# The test suite on a fresh machine: set up (with test extras and, where apt-get is allowed,
# Debian's chromium, g++ and dataset-fashion-mnist for the browser, compile and Fashion-MNIST
# tests), then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh test
# Debian packages some tests need: chromium (browser tests), g++ (torch.compile's CPU kernels),
# dataset-fashion-mnist (the real Fashion-MNIST files, checked against vaelab's checksums)
packages=""
[ -x /usr/bin/chromium ] || packages=" chromium"
command -v g++ >/dev/null || packages="$packages g++"
[ -d /usr/share/datasets/fashion-mnist ] || packages="$packages dataset-fashion-mnist"
if [ -n "$packages" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "installing Debian's$packages for the tests"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $packages >/dev/null) \
    || echo "warning: could not install$packages; the tests that need them will be skipped"
fi
.venv/bin/ruff check src tests benchmarks
set +e
.venv/bin/python -m pytest "$@"
code=$?
set -e
if [ "$code" = 5 ]; then
  echo "pytest collected no tests"
  exit 1
fi
exit "$code"
