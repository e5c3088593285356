#!/usr/bin/env bash
# The TensorRT backend's first-GPU-run checklist (scripts/gpu_check.py says what it checks),
# ending in one JSON summary on stdout. Exit 0: no GPU here, or every check passed; exit 1:
# a GPU, and TensorRT unusable, a TensorRT test skipped, or a check failed.
#   bash scripts/gpu-check.sh > gpu-check.json
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh --test >&2
exec timeout 540 .venv/bin/python scripts/gpu_check.py
