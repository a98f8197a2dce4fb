#!/usr/bin/env bash
# Creates .venv with torch, torchvision and crossdet_ray (with its test tools); safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch/torchvision: the pinned pairs of constraints.txt (PyPI's newest may not match a local
# torch); cluster.yaml's nodes install the same.
python -c "import torch, torchvision" 2>/dev/null \
    || python -m pip install --quiet torch torchvision -c constraints.txt
python -m pip install --quiet -e ".[test]" -c constraints.txt
# tests/analysis opens the evaluation report in a headless Chromium (the system's package).
if ! command -v chromium-headless-shell >/dev/null 2>&1 && ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q chromium-headless-shell >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get install -y -q chromium-headless-shell >/dev/null; } \
            || echo "setup.sh: could not install chromium-headless-shell; tests/analysis needs it" >&2
    else
        echo "setup.sh: install chromium-headless-shell (or chromium) for tests/analysis," \
             "e.g. sudo apt-get install chromium-headless-shell" >&2
    fi
fi
python -c "import crossdet_ray, torch, torchvision, ray; print('crossdet_ray ready: torch', torch.__version__, '| ray', ray.__version__)"
