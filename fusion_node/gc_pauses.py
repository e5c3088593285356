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

    def __init__(self) -> None:
        self._started_ns = 0
        self.collections = [0, 0, 0]
        self.max_ns = [0, 0, 0]
        self.total_ns = [0, 0, 0]

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started_ns = time.perf_counter_ns()
            return
        generation = info["generation"]
        pause_ns = time.perf_counter_ns() - self._started_ns
        self.collections[generation] += 1
        self.total_ns[generation] += pause_ns
        self.max_ns[generation] = max(self.max_ns[generation], pause_ns)

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
