#!/usr/bin/env bash
# Set up fusion-node on a fresh machine: system libraries, a virtual environment, the package.
#   scripts/setup.sh          runtime only (what `fusion-node run` needs)
#   scripts/setup.sh --test   plus torch and the test tools
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

# System packages, installed only when missing. PortAudio backs the microphone driver;
# jemalloc is the node's allocator (fusion_node/allocator.py). The tests also build the C++
# example subscriber (libzmq, cppzmq, msgpack-c headers).
packages="libportaudio2 libjemalloc2"
[ -n "$extras" ] && packages="$packages g++ libzmq3-dev cppzmq-dev libmsgpack-cxx-dev"
# espeak-ng (GPL-3, a test-time tool only) speaks the speech of the Silero VAD test.
[ -n "$extras" ] && packages="$packages espeak-ng"
missing=""
for package in $packages; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing="$missing $package"
done
if [ -n "$missing" ]; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    # shellcheck disable=SC2086
    $sudo apt-get install -y -qq $missing >/dev/null
fi

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}"
if [ -n "$extras" ]; then
    # Silero VAD's ONNX model (MIT) for the engine-spec test. The wheel declares torch as a
    # dependency, which its ONNX model does not need: --no-deps keeps pip from replacing the
    # pinned CPU torch with another build.
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "silero-vad==6.2.3"
fi
