#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py says what it measures): on one H100/H200 from a bare
# machine in under 8 minutes, install included; `--dry-run` runs every step once on the CPU.
#
#   make gpu-pack                 # here, once: the wheels the GPU image lacks -> .whl/
#   bash bench/gpu_check.sh       # there: -> bench/results_gpu.md and .json
#   bash bench/gpu_check.sh --dry-run
#
# Python: the project's .venv when there is one; otherwise the machine's python3 (a GPU image
# with torch, torchvision, timm and OpenCV), with the missing packages installed from .whl/
# without the network, into /tmp/clipstream-site. The bench corpus is built on first use, or
# carried in data/bench/corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    PY=python3
    if [ -d .whl ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/clipstream-site .whl/*.whl
        export PYTHONPATH="/tmp/clipstream-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    else
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
exec "$PY" -m bench.gpu_check "$@"
