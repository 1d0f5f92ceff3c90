#!/usr/bin/env bash
# Creates .venv and installs cskd with its test extras. PyTorch is pinned here (not in pyproject.toml, which
# declares ranges) because this machine family serves exactly these wheels from its local disk.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python -c "import cskd, torch; print(f'cskd {cskd.__version__} installed (torch {torch.__version__}) in .venv')"
