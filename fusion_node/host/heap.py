"""With glibc's malloc, hand the heap's free pages back to the kernel now and then.

The node's threads allocate and free windows, feeds, messages and model outputs of many sizes.
glibc keeps the pages of freed chunks resident inside its heaps, and as allocations land in
new places the set of touched pages creeps up although nothing is leaked: in a 15-minute soak
anonymous RSS rose 4 MB while Python's objects and malloc's in-use bytes stayed flat, and one
`malloc_trim(0)` (0.95 ms) gave the 4 MB back. `HeapTrimmer.trim` calls it; the node does so
every `TRIM_PERIOD_S`. It does not undo fragmentation, which is why the node prefers jemalloc
(`fusion_node.host.allocator`); under jemalloc, or without glibc, it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from typing import Any

from fusion_node.host.allocator import active_allocator

TRIM_PERIOD_S = 30.0


def _malloc_trim() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


class HeapTrimmer:
    """`malloc_trim(0)` on demand, with how often and how long it ran, for `node.health`."""

    def __init__(self) -> None:
        # ctypes drops the GIL for the call: the engines run on while it walks the heaps.
        self.allocator = active_allocator()
        self._trim = _malloc_trim() if self.allocator == "glibc" else None
        self.trims = 0
        self.released = 0  # calls that returned memory to the kernel
        self.max_ns = 0
        self.total_ns = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def trim(self) -> None:
        if self._trim is None:
            return
        start_ns = time.monotonic_ns()
        released = self._trim(0)
        elapsed_ns = time.monotonic_ns() - start_ns
        self.trims += 1
        self.released += int(released == 1)
        self.max_ns = max(self.max_ns, elapsed_ns)
        self.total_ns += elapsed_ns

    def summary(self) -> dict[str, Any]:
        return {"allocator": self.allocator, "available": self.available, "trims": self.trims,
                "released": self.released,
                "max_ms": round(self.max_ns / 1e6, 3), "total_ms": round(self.total_ns / 1e6, 3)}
