#!/usr/bin/env bash
# Headless Chromium + chromedriver for tests/test_ui_browser.py (Debian packages). Idempotent:
# does nothing when both are already installed. Needs root (or sudo) and the Debian mirror.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-dejavu-core
