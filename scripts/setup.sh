#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv and install iwmf-bench
# with its test extras. Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first, pinned to the release this project is tested with (CPU or CUDA build,
# whichever pip resolves for this platform); override with IWMF_BENCH_TORCH="torch==X torchvision==Y".
TORCH_SPEC=${IWMF_BENCH_TORCH:-"torch==2.14.1 torchvision==0.29.1"}
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  .venv/bin/pip install --quiet $TORCH_SPEC
fi
.venv/bin/pip install --quiet -e ".[dev,ray]"
