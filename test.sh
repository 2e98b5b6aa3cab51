#!/usr/bin/env bash
# Run the whole test suite, browser test included. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"

# The browser test drives Debian's Chromium through chromedriver.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
        echo "test: installing chromium and chromium-driver"
        apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver
    else
        echo "test: chromium or chromedriver is missing; the browser test will be skipped" >&2
    fi
fi

source scripts/setup.sh test
exec .venv/bin/python -m pytest "$@"
