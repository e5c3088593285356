"""Time for the whole node: integer nanoseconds on one clock. Nothing else reads time.

`MonotonicClock` is the host's CLOCK_MONOTONIC. `ReplayClock` is driven by a log's times so a
replay is deterministic: sleeping on it waits until the replay has advanced far enough.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now_ns(self) -> int:
        """Current time in integer nanoseconds."""
        ...

    def sleep_until(self, t_ns: int) -> None:
        """Block the calling thread until `now_ns() >= t_ns`."""
        ...


# On Linux, Python >= 3.11 sleeps with clock_nanosleep(TIMER_ABSTIME) and releases the GIL,
# which wakes within ~0.1 ms. Spinning for the last stretch removes the wake-up latency
# without burning a core for the whole wait.
_SPIN_NS = 300_000


def thread_cpu_ns() -> int:
    """CPU time the calling thread has used: what a piece of work costs, without its waits."""
    return time.thread_time_ns()


class MonotonicClock:
    """CLOCK_MONOTONIC in nanoseconds, shared by every process on the host."""

    def __init__(self, spin_ns: int = _SPIN_NS) -> None:
        self._spin_ns = spin_ns

    def now_ns(self) -> int:
        return time.monotonic_ns()

    def sleep_until(self, t_ns: int) -> None:
        remaining = t_ns - time.monotonic_ns()
        if remaining > self._spin_ns:
            time.sleep((remaining - self._spin_ns) / 1e9)
        while time.monotonic_ns() < t_ns:
            pass


class ReplayClock:
    """A clock whose time is set by a replay; sleepers wake when it passes their deadline."""

    def __init__(self, start_ns: int = 0) -> None:
        self._now_ns = start_ns
        self._changed = threading.Condition()
        self._closed = False

    def now_ns(self) -> int:
        return self._now_ns

    def advance_to(self, t_ns: int) -> None:
        """Move time forward (never backward) and wake sleepers whose deadline passed."""
        with self._changed:
            if t_ns > self._now_ns:
                self._now_ns = t_ns
                self._changed.notify_all()

    def close(self) -> None:
        """End of the log: wake every sleeper so threads can exit."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def sleep_until(self, t_ns: int) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._now_ns >= t_ns or self._closed)
