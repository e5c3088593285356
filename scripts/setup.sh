#!/usr/bin/env bash
# Set up fusion-node on a fresh machine: system libraries, a virtual environment, the package.
#   scripts/setup.sh          runtime only (what `fusion-node run` needs)
#   scripts/setup.sh --test   plus torch and the test tools
# Python packages come from the lock (requirements/*.txt, exact versions with their hashes),
# never from whatever the registries serve today: `bash scripts/lock.sh` regenerates it.
set -euo pipefail
cd "$(dirname "$0")/.."

lock=requirements/runtime.txt
[ "${1:-}" = "--test" ] && lock=requirements/test.txt

# System packages, installed only when missing. PortAudio backs the microphone driver;
# jemalloc is the node's allocator (fusion_node/host/allocator.py). The tests also build the C++
# example subscriber (libzmq, cppzmq, msgpack-c headers).
packages="libportaudio2 libjemalloc2"
[ "$lock" = requirements/test.txt ] && packages="$packages g++ libzmq3-dev cppzmq-dev libmsgpack-cxx-dev"
# The speech corpus's synthesizers and real recordings (tools of training and its tests, never
# loaded by the node): espeak-ng (GPL-3), flite and festival with three voices built from
# recordings of real speakers, and klettres-data (real people saying letters and syllables).
[ "$lock" = requirements/test.txt ] && packages="$packages espeak-ng flite festival \
    festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts klettres-data"
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
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# --no-deps: the lock names every package already; nothing outside it may slip in.
"${pip[@]}" --require-hashes --no-deps -r "$lock"
# The project itself, built with the locked setuptools instead of a fresh download.
"${pip[@]}" --no-deps --no-build-isolation -e .
# A venv set up before (or for the other lock) may hold packages this lock does not name.
extras=$(.venv/bin/python scripts/lockcheck.py --extras "$lock")
if [ -n "$extras" ]; then
    # shellcheck disable=SC2086
    .venv/bin/python -m pip uninstall -q -y $extras
fi
.venv/bin/python scripts/lockcheck.py "$lock" \
    || { echo "setup: the environment does not match $lock" >&2; exit 1; }
