"""The environment the tests run in is exactly the lock (requirements/test.txt)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_lockcheck(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "lockcheck.py"), *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_installed_packages_are_exactly_the_test_lock():
    result = run_lockcheck(str(REPO / "requirements" / "test.txt"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_version_other_than_the_locked_one_is_named(tmp_path):
    lock = (REPO / "requirements" / "test.txt").read_text()
    import numpy

    assert f"numpy=={numpy.__version__} " in lock
    (tmp_path / "lock.txt").write_text(lock.replace(f"numpy=={numpy.__version__} ",
                                                    "numpy==1.0.0 "))
    result = run_lockcheck(str(tmp_path / "lock.txt"))
    assert result.returncode == 1
    assert f"numpy: locked 1.0.0, installed {numpy.__version__}" in result.stdout


def test_runtime_lock_is_a_subset_of_the_test_lock_at_the_same_versions():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import lockcheck
    finally:
        sys.path.pop(0)
    runtime = lockcheck.locked(REPO / "requirements" / "runtime.txt")
    test = lockcheck.locked(REPO / "requirements" / "test.txt")
    assert runtime and {name: test.get(name) for name in runtime} == runtime
