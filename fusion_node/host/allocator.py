"""The node's C allocator: jemalloc where it is installed, so RSS stays flat over days.

With glibc's malloc a soak's anonymous RSS rose about 9 MB in 30 minutes though nothing was
leaked: Python's objects and malloc's in-use bytes stayed flat, and a soak without faults
stayed flat too. The rise came with the faults, most with the 10x publisher flood: bursts of
small messages allocated on the receiver's and ZeroMQ's threads and freed on others leave
the heaps fragmented, and `malloc_trim` cannot return a page that still holds one live chunk.
jemalloc keeps per-size runs and purges unused pages on its own: the same soak under it rose
2.8 MB, with no deadline miss.

`fusion-node run`, `launch` and `bench` re-execute themselves once with jemalloc preloaded
when `libjemalloc.so.2` is installed (`scripts/setup.sh` installs it). Set
`FUSION_NODE_ALLOCATOR=glibc` to keep glibc's malloc; `node.health` says which one runs.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

ALLOCATOR_ENV = "FUSION_NODE_ALLOCATOR"
_REEXECUTED_ENV = "FUSION_NODE_REEXECUTED"
# Debian and Ubuntu (libjemalloc2) on x86-64 and arm64, then Fedora and others.
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2")


def active_allocator() -> str:
    """"jemalloc" if it is mapped into this process, else "glibc"."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "glibc"
    return "jemalloc" if "libjemalloc" in maps else "glibc"


def jemalloc_path() -> str | None:
    return next((p for p in JEMALLOC_PATHS if os.path.exists(p)), None)


def reexecute_with_jemalloc(argv: list[str], module: str = "fusion_node.cli") -> None:
    """Replace this process (same pid, so systemd's notify still reaches it) by
    `python -m <module> *argv` with jemalloc preloaded; return if it is not wanted, not
    installed, already loaded, or this process is already the re-executed one."""
    wanted = os.environ.get(ALLOCATOR_ENV, "jemalloc")
    if wanted not in ("jemalloc", "glibc"):
        raise SystemExit(f"{ALLOCATOR_ENV}={wanted!r}: expected 'jemalloc' or 'glibc'")
    if wanted == "glibc" or os.environ.get(_REEXECUTED_ENV) or active_allocator() == "jemalloc":
        return
    path = jemalloc_path()
    if path is None:
        return
    preload = " ".join(p for p in (path, os.environ.get("LD_PRELOAD", "")) if p)
    env = {**os.environ, "LD_PRELOAD": preload, _REEXECUTED_ENV: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    # Held across exec (the mask survives it, handlers do not): a stop asked for meanwhile
    # waits for the new process's handlers instead of interrupting its imports.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


if __name__ == "__main__":  # which allocator a process started like this one gets
    print(active_allocator())
