#!/bin/sh
# Headless Chromium for the dashboard's browser test (tests/test_dashboard.py), from
# Debian's packages. Idempotent: does nothing when chromium and chromedriver are there.
#   sh dashboard/install_browser.sh
set -eu

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    echo "install_browser: $(/usr/bin/chromium --version 2>/dev/null || echo chromium) already installed"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: apt-get not found; install Chromium and its driver so that /usr/bin/chromium and" >&2
    echo "/usr/bin/chromedriver exist (Debian/Ubuntu packages: chromium chromium-driver)" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install_browser: not root and no sudo; run as root: apt-get install -y chromium chromium-driver" >&2
        exit 1
    fi
fi

echo "install_browser: installing chromium and chromium-driver from Debian's packages"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
/usr/bin/chromium --version
