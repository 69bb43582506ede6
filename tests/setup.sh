#!/usr/bin/env bash
# Installs what the tests need: Python packages, and Debian's chromium for the browser tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian's chromium (the tests drive its headless build: harness/browser.py; the desktop package
# brings the same fonts and libraries as before) for the browser tests, haproxy for the lecture hall's sticky proxy (harness/proxy.py)
if [ ! -x /usr/bin/chromium-headless-shell ] || [ ! -x /usr/bin/chromium ] || [ ! -x /usr/sbin/haproxy ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-headless-shell haproxy > /dev/null
fi
# the Ray executor's tests run for real in CI: its requirements too, in one resolve
python -m pip install -q -r requirements-dev.txt -r requirements-ray.txt
