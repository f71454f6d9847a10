#!/usr/bin/env bash
# The main job: set up the environment if needed, then run the default benchmark suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/iwmf-bench purify --defense iwmf --lambda-0 0.25 --seed 0 \
  --input ../shared/data/iwmfdiff-imgs/source --output out/purified "$@"
