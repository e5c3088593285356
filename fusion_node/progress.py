"""Progress bars of the long commands (evals, training, benches), all drawn the same way.

The bar goes to stderr, so stdout (`--json`) stays clean, and only when stderr is a terminal:
tqdm's `disable=None` turns it off otherwise, so logs and CI get no bar and no carriage
returns. A bar that is off still counts (`n`, `total`) and costs next to nothing in a loop.
Nothing here starts a thread: a bar is redrawn from the caller's own loop, so nothing runs
beside what a bench measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

# Seconds of a run, not items: no rate (it would read "1.00s/s").
_SECONDS_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}]"


class Bar(tqdm):
    """tqdm, with a way to set where the bar is rather than add to it, and with the log
    records on the console written above the bar while it is drawn."""

    # No monitor thread (nothing may run beside what a bench measures); it exists to undo
    # tqdm's dynamic `miniters`, which `miniters=1` turns off: a redraw at most every
    # `mininterval` (0.1 s) of time and every 1 unit of progress.
    monitor_interval = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Through tqdm, a record clears the bar, is written, and the bar is drawn again;
        # without, the record would be written into the bar's line.
        self._log_redirect = contextlib.ExitStack()
        if not self.disable:
            self._log_redirect.enter_context(logging_redirect_tqdm(tqdm_class=Bar))

    def close(self) -> None:
        try:
            super().close()
        finally:
            with contextlib.suppress(AttributeError):  # __init__ failed before it was set
                self._log_redirect.close()

    def at(self, done: float) -> None:
        """Move the bar to `done` (at most its total: a timed run may end a little late)."""
        self.update((done if self.total is None else min(done, self.total)) - self.n)


def _width() -> dict[str, Any]:
    """Follow the terminal's width; or 80 columns where it reports none (a pseudo-terminal
    nobody sized, as some CI runners open), on which tqdm would draw nothing at all."""
    try:
        columns = os.get_terminal_size(sys.stderr.fileno()).columns
    except (AttributeError, OSError, ValueError):  # not a terminal: the bar is off anyway
        columns = 0
    return {"dynamic_ncols": True} if columns > 0 else {"ncols": 80, "nrows": 24}


def progress(iterable: Iterable[Any] | None = None, *, desc: str, total: float | None = None,
             unit: str = "it") -> Bar:
    """A bar over `iterable` (iterate the bar) or over `total` units (`bar.update(n)`,
    `bar.at(done)`); use it as a context manager, so that it is closed on any exit."""
    return Bar(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, disable=None,
               miniters=1, **_width())


def progress_seconds(seconds: float, *, desc: str) -> Bar:
    """A bar of a run that lasts `seconds`, moved with `bar.at(elapsed_s)`."""
    return Bar(desc=desc, total=seconds, file=sys.stderr, disable=None, miniters=1,
               bar_format=_SECONDS_FORMAT, **_width())


@contextlib.asynccontextmanager
async def progress_seconds_async(seconds: float, *, desc: str) -> AsyncIterator[Bar]:
    """A bar of a run that lasts `seconds` and waits in its event loop: a task moves it to
    the elapsed time once a second, and the exit to where the run ended. With the bar off,
    no task: a run without a terminal gets no extra wake-ups."""
    with progress_seconds(seconds, desc=desc) as bar:
        if bar.disable:
            yield bar
            return
        started = time.monotonic()

        async def redraw() -> None:
            while True:
                bar.at(time.monotonic() - started)
                await asyncio.sleep(1.0)

        task = asyncio.create_task(redraw())
        try:
            yield bar
        finally:
            task.cancel()
            bar.at(time.monotonic() - started)


def write(line: str) -> None:
    """Print a log line to stdout, as `print` would, without tearing a bar that is drawn
    (tqdm clears it, prints, and redraws it); flushed, so that a log file follows the run."""
    Bar.write(line, file=sys.stdout)
    sys.stdout.flush()
