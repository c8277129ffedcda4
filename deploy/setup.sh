#!/usr/bin/env bash
# Sets up .venv with everything vlmserve needs, on a fresh machine.
#   bash deploy/setup.sh               # to serve
#   bash deploy/setup.sh --test-tools  # also what the tests drive: Chromium, systemd and a Java
#                                      # runtime for openapi-generator (apt)
# torch comes first and pinned: on a CPU box pip then takes the CPU wheel instead of
# downloading a multi-GB CUDA build. Set VLMSERVE_TORCH to choose another torch spec.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--test-tools" ]]; then
  missing=()
  command -v chromium >/dev/null || missing+=(chromium)
  command -v systemd-analyze >/dev/null || missing+=(systemd)
  command -v curl >/dev/null || missing+=(curl)
  command -v java >/dev/null || missing+=(default-jre-headless)
  if ((${#missing[@]})); then
    sudo=""; [[ $(id -u) == 0 ]] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q "${VLMSERVE_TORCH:-torch==2.13.0}"
.venv/bin/pip install -q -e ".[test]"
echo "vlmserve is set up in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
