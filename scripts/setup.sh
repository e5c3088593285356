#!/usr/bin/env bash
# Set up fusion-node on a fresh machine: system libraries, a virtual environment, the package.
#   scripts/setup.sh          runtime only (what `fusion-node run` needs)
#   scripts/setup.sh --test   plus torch and the test tools
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

# PortAudio backs the microphone driver; it is a system library, not a Python package.
if ! ldconfig -p 2>/dev/null | grep -q libportaudio.so.2; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq libportaudio2 >/dev/null
fi

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}"
