"""Shared fixtures for driver tests."""

from __future__ import annotations

import threading

import pytest


class SteppingClock:
    """A `Clock` whose sleeps return at once by jumping time forward.

    Paced drivers then run instantly and deterministically, and pacing is checked exactly:
    after a sample is delivered, `now_ns()` is the time the driver waited for.
    """

    def __init__(self, start_ns: int) -> None:
        self._now_ns = start_ns
        self._lock = threading.Lock()

    def now_ns(self) -> int:
        return self._now_ns

    def sleep_until(self, t_ns: int) -> None:
        with self._lock:
            self._now_ns = max(self._now_ns, t_ns)


@pytest.fixture
def stepping_clock() -> SteppingClock:
    # Days after boot, mid speech segment: stamps must survive large clock values.
    return SteppingClock(start_ns=3 * 86_400 * 10**9 + 300_000_000)
