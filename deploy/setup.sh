#!/usr/bin/env bash
# Sets up .venv with everything vlmserve and its tests need, on a fresh machine.
# torch comes first and pinned: on a CPU box pip then takes the CPU wheel instead of
# downloading a multi-GB CUDA build. Set VLMSERVE_TORCH to choose another torch spec.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q "${VLMSERVE_TORCH:-torch==2.13.0}"
.venv/bin/pip install -q -e ".[test]"
echo "vlmserve is set up in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
