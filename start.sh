#!/usr/bin/env bash
# The main job: set everything up, train the demo runs if runs/ has none, serve the dashboard.
# Extra arguments go to `deepcontrol start` (see `deepcontrol start --help`).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh
exec .venv/bin/deepcontrol start "$@"
