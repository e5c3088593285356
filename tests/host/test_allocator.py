"""The node's processes re-execute themselves once with jemalloc preloaded, unless told not to."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fusion_node.host.allocator import ALLOCATOR_ENV, jemalloc_path

REEXECUTE = ("from fusion_node.host.allocator import reexecute_with_jemalloc; "
             "reexecute_with_jemalloc([], module='fusion_node.host.allocator'); "
             "print('not re-executed')")


def _run(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("LD_PRELOAD", ALLOCATOR_ENV, "FUSION_NODE_REEXECUTED")}
    return subprocess.run([sys.executable, "-c", REEXECUTE], capture_output=True, text=True,
                          check=False,
                          env={**clean, **env}, timeout=60)


@pytest.mark.skipif(jemalloc_path() is None,
                    reason="libjemalloc2 is not installed (scripts/setup.sh installs it)")
def test_reexecutes_once_with_jemalloc_mapped():
    result = _run()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "jemalloc"


def test_glibc_when_asked():
    result = _run(**{ALLOCATOR_ENV: "glibc"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "not re-executed"


def test_an_unknown_allocator_is_refused_by_name():
    result = _run(**{ALLOCATOR_ENV: "tcmalloc"})
    assert result.returncode != 0
    assert "FUSION_NODE_ALLOCATOR='tcmalloc'" in result.stderr



@pytest.mark.skipif(jemalloc_path() is None,
                    reason="libjemalloc2 is not installed (scripts/setup.sh installs it)")
def test_a_reexecuted_bench_can_stop_the_processes_it_starts():
    """The re-exec holds SIGINT/SIGTERM blocked across exec. A bench (not a node command)
    once kept them blocked, and so did every process it started: `bench clock` could not
    stop its clock server with SIGTERM, failed, and left the server running."""
    from pathlib import Path

    command = Path(sys.executable).parent / "fusion-node"
    result = subprocess.run([str(command), "bench", "clock", "--duration", "2", "--json"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "TimeoutExpired" not in result.stderr
