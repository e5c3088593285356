#!/usr/bin/env bash
# Regenerate the dependency lock from pyproject.toml's ranges, then set up from it and run the
# tests. Commit pyproject.toml and requirements/*.txt together.
#   requirements/runtime.txt  what `scripts/setup.sh` installs: every platform, Python >= 3.11
#   requirements/test.txt     what `scripts/setup.sh --test` installs: the runtime set plus
#                             torch (the CPU build, 2.13.0+cpu, found in $WHEELS) and the test
#                             tools, for x86-64 Linux and Python 3.11, the CI machine
#   requirements/tools.txt    uv itself, which compiles the lock
#   requirements/mutation.txt mutmut, for scripts/mutation.sh, within the test lock
# Pass --upgrade to move every package to the newest version the ranges allow; without it, uv
# keeps the versions already locked where they still fit.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-/opt/wheels}
upgrade=()
[ "${1:-}" = "--upgrade" ] && upgrade=(--upgrade)

source scripts/uv.sh
compile=("$UV" pip compile --quiet --generate-hashes --python-version 3.11 "${upgrade[@]}")
"${compile[@]}" --universal requirements/tools.in -o requirements/tools.txt
"${compile[@]}" --python-platform x86_64-manylinux_2_28 --find-links "$WHEELS" \
    pyproject.toml requirements/build.in --extra test -o requirements/test.txt
# The runtime set is resolved within the tested versions, so what a user installs is what CI
# ran (an extra may cap a shared package: lerobot-dataset keeps OpenCV below 4.13).
"${compile[@]}" --universal --constraint requirements/test.txt \
    pyproject.toml requirements/build.in -o requirements/runtime.txt
"${compile[@]}" --python-platform x86_64-manylinux_2_28 --constraint requirements/test.txt \
    requirements/mutation.in -o requirements/mutation.txt
grep -q '^torch==.*+cpu' requirements/test.txt \
    || { echo "lock: torch resolved to a CUDA build; is the CPU wheel in $WHEELS?" >&2; exit 1; }

bash scripts/setup.sh --test && .venv/bin/python -m pytest -q
