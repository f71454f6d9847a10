#!/usr/bin/env bash
# The main job: set up the environment if needed, then run the default benchmark suite
# (the shipped suite `default`, configs/default.yaml); results are cached in results/, leaderboards go to
# leaderboards/default/ and figures to imgs/. Extra arguments go to `iwmf-bench run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/iwmf-bench run --all "$@"
