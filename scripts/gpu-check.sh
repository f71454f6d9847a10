#!/usr/bin/env bash
# The GPU check (usage: scripts/gpu-check.sh --help). The work is done by scripts/gpu_check.py,
# which only needs Python's standard library (3.9 or newer): it runs with python3, or with
# $PYTHON_FOR_SCRIPT where that is set (the check's own PYTHON argument is separate).
exec "${PYTHON_FOR_SCRIPT:-python3}" "$(dirname "$0")/gpu_check.py" "$@"
