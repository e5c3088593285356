"""Time for the whole node: integer nanoseconds on one clock. Nothing else reads time.

`MonotonicClock` is the host's CLOCK_MONOTONIC. `ReplayClock` is driven by a log's times so a
replay is deterministic: sleeping on it waits until the replay has advanced far enough.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
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


@dataclass(frozen=True)
class WallClockMapping:
    """One reading of the wall clock (CLOCK_REALTIME) placed on CLOCK_MONOTONIC: turns
    monotonic stamps into wall time for people (Foxglove's timeline). Stamps stay monotonic;
    this is display metadata, and a wall clock stepped later (NTP) is not followed."""

    monotonic_ns: int  # the middle of the bracket the wall clock was read in
    wall_ns: int
    uncertainty_ns: int  # half that bracket: the true pairing is within ± this

    def to_wall_ns(self, t_ns: int) -> int:
        return t_ns + (self.wall_ns - self.monotonic_ns)

    def to_json(self) -> str:
        return json.dumps({"monotonic_ns": self.monotonic_ns, "wall_ns": self.wall_ns,
                           "uncertainty_ns": self.uncertainty_ns})

    @classmethod
    def from_json(cls, text: str) -> WallClockMapping:
        """The mapping `to_json` wrote; ValueError if `text` is not one."""
        try:
            data = json.loads(text)
            values = [data[k] for k in ("monotonic_ns", "wall_ns", "uncertainty_ns")]
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"not a wall clock mapping: {text[:80]!r} ({exc})") from None
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"not a wall clock mapping: {text[:80]!r} (integers expected)")
        return cls(*values)


def measure_wall_clock(tries: int = 64) -> WallClockMapping:
    """Read the wall clock between two monotonic reads `tries` times and keep the tightest
    bracket: a read preempted or delayed by the GIL widens its bracket and is not kept."""
    best: tuple[int, int, int] | None = None
    for _ in range(tries):
        before = time.monotonic_ns()
        wall = time.time_ns()
        after = time.monotonic_ns()
        if best is None or after - before < best[2] - best[0]:
            best = (before, wall, after)
    assert best is not None
    before, wall, after = best
    return WallClockMapping((before + after) // 2, wall, (after - before + 1) // 2)


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
