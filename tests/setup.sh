#!/usr/bin/env bash
# Installs what the tests need: Python packages, and Debian's chromium for the browser tests.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium > /dev/null
fi
python -m pip install -q -r requirements-dev.txt
python -m pip install -q -r requirements-ray.txt  # the Ray executor's tests run for real in CI
