#!/usr/bin/env bash
# Create .venv and install the project into it. Sourced by start.sh and test.sh.
#
# torch is installed first and pinned to 2.13.0: on our machines that version is a CPU wheel on
# local disk, and asking for it explicitly keeps pip from resolving a multi-GB CUDA build.
# Elsewhere, point pip at the CPU wheels first (for example PIP_INDEX_URL set to PyTorch's CPU
# index) or install torch yourself: an importable torch is kept as it is.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DEEPCONTROL_VENV:-$repo_root/.venv}"
python_bin="${PYTHON:-python3}"

if [[ ! -x "$venv/bin/python" ]]; then
    echo "setup: creating virtual environment $venv"
    "$python_bin" -m venv "$venv"
fi
pip_install=("$venv/bin/python" -m pip install --disable-pip-version-check -q)

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "setup: installing torch==2.13.0 (CPU build)"
    "${pip_install[@]}" "torch==2.13.0"
fi

extras="${1:-}"
stamp="$venv/.deepcontrol-installed$extras"
if [[ ! -f "$stamp" || "$repo_root/pyproject.toml" -nt "$stamp" ]]; then
    echo "setup: installing deepcontrol${extras:+[$extras]} and its dependencies"
    "${pip_install[@]}" -e "$repo_root${extras:+[$extras]}"
    touch "$stamp"
fi
