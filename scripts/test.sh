#!/usr/bin/env bash
# Set up the environment if needed, then run the test suite (CPU only; GPU tests are
# marked `gpu` and run on a GPU machine with `.venv/bin/python -m pytest -m gpu`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
