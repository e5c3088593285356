"""Pauses of Python's cyclic garbage collector, for `node.health`.

A collection holds the GIL, so every thread of the node (engine runners, the publisher)
waits it out: on a robot a late prediction with a long pause beside it has its cause named.
"""

from __future__ import annotations

import gc
import time
from typing import Any


class GcPauses:
    """Counts collections per generation and their longest and total pause while installed."""

    LONG_NS = 5_000_000
    LONG_KEPT = 1000

    def __init__(self) -> None:
        self._started_ns = 0
        self.collections = [0, 0, 0]
        self.max_ns = [0, 0, 0]
        self.total_ns = [0, 0, 0]
        # Pauses of at least LONG_NS as (start, end, generation) on CLOCK_MONOTONIC, the
        # node's clock, to set beside late predictions; the first LONG_KEPT of them.
        self.long_pauses: list[tuple[int, int, int]] = []

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started_ns = time.monotonic_ns()
            return
        generation = info["generation"]
        end_ns = time.monotonic_ns()
        pause_ns = end_ns - self._started_ns
        self.collections[generation] += 1
        self.total_ns[generation] += pause_ns
        self.max_ns[generation] = max(self.max_ns[generation], pause_ns)
        if pause_ns >= self.LONG_NS and len(self.long_pauses) < self.LONG_KEPT:
            self.long_pauses.append((self._started_ns, end_ns, generation))

    def overlapping_ms(self, start_ns: int, end_ns: int) -> float:
        """Total long pause within [start_ns, end_ns]."""
        return sum(max(0, min(end, end_ns) - max(start, start_ns))
                   for start, end, _ in self.long_pauses) / 1e6

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def remove(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def summary(self) -> dict[str, Any]:
        """Per generation: collections, longest pause (ms), total pause (ms)."""
        return {f"gen{g}": {"collections": self.collections[g],
                            "max_ms": round(self.max_ns[g] / 1e6, 3),
                            "total_ms": round(self.total_ns[g] / 1e6, 3)} for g in range(3)}
