#!/usr/bin/env bash
# Mutation testing of the core: mutmut changes protocol, shm, alignment, scheduling, bindings,
# the recorder, replay and the client one small edit at a time (pyproject.toml [tool.mutmut]
# lists the files and the tests), and runs the tests that reach each change. A mutant no test
# notices "survives". Not in CI: about 1 mutant a second on 2 cores, so about 85 minutes for
# the 5,000 mutants; `bash scripts/mutation.sh 'fusion_node.shm*'` runs one module's.
#   bash scripts/mutation.sh     writes docs/mutation.md (scores) and
#                                docs/mutation-survivors.txt (every survivor, with its diff)
# Equivalent mutants (no behaviour changes) are listed with their reason in
# docs/mutation-equivalent.txt and left out of the score.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-mutation
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
[ -x $venv/bin/python ] || "$python" -m venv $venv
pip=($venv/bin/python -m pip install -q --disable-pip-version-check)
"${pip[@]}" --require-hashes --no-deps -r requirements/test.txt -r requirements/mutation.txt
"${pip[@]}" --no-deps --no-build-isolation -e .
rm -rf mutants
# mutmut redraws a progress line many times a second: keep it out of the terminal, and
# show its end if the run fails (a clean-test failure stops it before any mutant runs).
log=${TMPDIR:-/tmp}/fusion-node-mutmut.log
if ! $venv/bin/mutmut run --max-children "$(nproc)" "$@" >"$log" 2>&1; then
    echo "mutation: mutmut run failed; the end of $log:" >&2
    tail -c 4000 "$log" | tr '\r' '\n' | tail -25 >&2
    exit 1
fi
$venv/bin/python scripts/mutation_report.py
