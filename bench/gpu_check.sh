#!/bin/bash
# bench/gpu_check.sh [args]: the GPU check of issue 10 on a machine with one NVIDIA GPU and no
# network (torch, transformers and triton there; vlmserve's other dependencies installed from
# carried wheels). Builds 7B-shaped random bf16 checkpoints, checks greedy parity with
# transformers for 32 steps, prints decode tok/s at batch 1, 32 and 128 next to the
# HBM-bandwidth bound; a table and bench/results/gpu_check.json, within 8 minutes. Arguments go
# to bench/gpu_check.py (--hbm-tb-s, --models, --batches, --workdir ...).
# Dry run without a GPU: --device cpu --tiny.
set -euo pipefail
HERE=$(dirname "$(readlink -f "$0")")
ROOT=$(dirname "$HERE")
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
# Not installed: import this checkout as `vlmserve` (the repository root is the package), in this
# process and in the engine processes it starts.
if ! "$PY" -c "import vlmserve" 2>/dev/null; then
  PKGS=$(mktemp -d)
  trap 'rm -rf "$PKGS"' EXIT
  ln -s "$ROOT" "$PKGS/vlmserve"
  export PYTHONPATH="$PKGS${PYTHONPATH:+:$PYTHONPATH}"
fi
# What the engine imports, checked before minutes are spent building checkpoints.
if ! "$PY" -c "import vlmserve.deploy.launcher, vlmserve.frontend.prompts, vlmserve.workers.process"; then
  echo "gpu_check: vlmserve's dependencies are missing here (above); install them from wheels:" \
    "pip install --no-index --find-links WHEELS <the dependencies in pyproject.toml>" >&2
  exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader || true
# The script keeps its own 8-minute budget (--budget-s); this is the backstop.
timeout --signal=TERM --kill-after=20 "${GPU_CHECK_TIMEOUT:-540}" "$PY" "$HERE/gpu_check.py" "$@"
