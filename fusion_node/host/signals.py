"""SIGINT and SIGTERM: the one place that turns them into a graceful stop.

`stop_on_signals(stop)` sets `stop` on the first signal and exits at once (128 + signal) on
the second, so an operator can always get out of a stop that hangs. For an `asyncio.Event`
the handlers go through the running loop (they wake it); for a `threading.Event` they are
plain signal handlers. Either way the previous handlers are back after the `with` block.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
log = logging.getLogger("fusion_node")
_early: list[int] = []  # signals that came before `stop_on_signals` was installed


def catch_early_signals() -> None:
    """Remember SIGINT/SIGTERM from the first instruction on, for `stop_on_signals` to act
    on: a process started in a script's background inherits SIGINT ignored, and the imports
    and start-up before the real handlers take about half a second."""
    for signum in SIGNALS:
        signal.signal(signum, lambda signum, _frame: _early.append(signum))
    # A re-executed process (host/allocator.py) starts with them blocked: deliver them now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def unblock_signals() -> None:
    """Deliver SIGINT/SIGTERM as usual again. A re-executed process (host/allocator.py)
    starts with them blocked; a command without `catch_early_signals` would otherwise keep
    them blocked for good, and so would every process it starts (the mask is inherited)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event | threading.Event) -> Iterator[None]:
    """First SIGINT/SIGTERM sets `stop`; a second one exits at once."""

    def handle(signum: int, *_: object) -> None:
        if stop.is_set():
            os._exit(128 + signum)
        log.info("%s: shutting down", signal.Signals(signum).name)
        stop.set()

    if _early:  # asked to stop during start-up: stop as soon as the caller waits
        log.info("%s during start-up: shutting down", signal.Signals(_early[0]).name)
        stop.set()
    if isinstance(stop, asyncio.Event):
        loop = asyncio.get_running_loop()
        for signum in SIGNALS:
            loop.add_signal_handler(signum, handle, signum)
        try:
            yield
        finally:
            for signum in SIGNALS:
                loop.remove_signal_handler(signum)
        return
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    for signum in SIGNALS:
        signal.signal(signum, handle)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def cancel_on_signals(task: asyncio.Task[object]) -> Iterator[None]:
    """SIGINT and SIGTERM cancel `task` (a driver's publishing loop, whose cancellation
    disconnects the driver); the handlers are removed afterwards."""
    loop = asyncio.get_running_loop()
    for signum in SIGNALS:
        loop.add_signal_handler(signum, task.cancel)
    try:
        yield
    finally:
        for signum in SIGNALS:
            loop.remove_signal_handler(signum)
