#!/usr/bin/env bash
# What the browser tests need beyond pip: Chromium (Debian/Ubuntu's package, through apt-get: as root
# directly, otherwise through sudo) and onnxruntime-web (npm, Node.js 18 or newer, into web/).
# The README's set-up and .ci/run both run this file, so they cannot drift apart.
#
# Where a piece cannot be installed here (no apt-get, neither root nor sudo, no npm) it says so and
# goes on: the browser tests are then skipped, with a reason naming this script. Under .ci/run
# (DEPTH_DISTILL_REQUIRE_ALL_TESTS=1) the same gap fails here, before the tests. A command that
# runs and fails (a network error) always fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."

required=${DEPTH_DISTILL_REQUIRE_ALL_TESTS:-0}
missing() {
    if [ "$required" = 1 ]; then
        echo "install_browser.sh: $1 (required: DEPTH_DISTILL_REQUIRE_ALL_TESTS=1)" >&2
        exit 1
    fi
    echo "install_browser.sh: $1; the browser tests will be skipped" >&2
}

if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
    :
elif ! command -v apt-get >/dev/null; then
    missing "no apt-get here: install Chromium with your system's package manager (or set DEPTH_DISTILL_CHROMIUM=PATH)"
else
    as_root=()
    if [ "$(id -u)" != 0 ]; then
        as_root=(sudo)
    fi
    if [ ${#as_root[@]} -gt 0 ] && ! command -v sudo >/dev/null; then
        missing "Chromium needs root to install and there is no sudo: run 'apt-get install chromium' as root"
    else
        "${as_root[@]}" apt-get update -q
        "${as_root[@]}" apt-get install -y -q --no-install-recommends chromium
    fi
fi

if command -v npm >/dev/null; then
    npm ci --prefix web --no-audit --no-fund
else
    missing "no npm here: install Node.js 18 or newer, then run 'npm ci --prefix web'"
fi
