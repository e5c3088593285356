# Sourced by the lock scripts: uv, at the locked version, in its own venv (.venv-tools).
[ -x .venv-tools/bin/python ] || python3 -m venv .venv-tools
.venv-tools/bin/python -m pip install -q --disable-pip-version-check --require-hashes \
    --no-deps -r requirements/tools.txt
UV=.venv-tools/bin/uv
