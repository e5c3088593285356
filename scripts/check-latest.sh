#!/usr/bin/env bash
# Drift check, not part of CI: install the newest versions that pyproject.toml's ranges allow
# into a scratch venv and run the tests there. It prints which packages moved from the lock
# and which tests broke; exit status is pytest's. If it is green, `bash scripts/lock.sh
# --upgrade` can move the lock; if not, the failures say which range needs an upper bound.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-/opt/wheels}
source scripts/uv.sh
scratch=$(mktemp -d /tmp/fusion-node-latest.XXXXXX)
echo "check-latest: scratch environment in $scratch"
"$UV" pip compile --quiet --upgrade --generate-hashes --python-version 3.11 \
    --python-platform x86_64-manylinux_2_28 --find-links "$WHEELS" \
    pyproject.toml requirements/build.in --extra test -o "$scratch/latest.txt" || exit 1
python3 -m venv "$scratch/venv"
"$scratch/venv/bin/python" -m pip install -q --disable-pip-version-check --require-hashes \
    --no-deps -r "$scratch/latest.txt" || exit 1
"$scratch/venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
    --no-build-isolation -e . || exit 1
echo "check-latest: packages newer than the lock (requirements/test.txt):"
"$scratch/venv/bin/python" scripts/lockcheck.py requirements/test.txt | sed 's/^/  /'
# The lock test would only repeat the list above.
"$scratch/venv/bin/python" -m pytest -q -rfE -p no:cacheprovider \
    --deselect tests/test_lock.py::test_installed_packages_are_exactly_the_test_lock
status=$?
[ $status -eq 0 ] && echo "check-latest: the newest allowed versions pass" \
    || echo "check-latest: the newest allowed versions break the tests above"
exit $status
