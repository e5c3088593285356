"""Fixed-rate engine ticks and fixed-latency publication on absolute deadlines.

Each engine has a tick grid t_ref = k · period on the node clock (absolute, so replays and
restarts land on the same grid) and a declared latency L. Its runner thread assembles the
window at t_ref + align_delay, runs inference, and hands the prediction to the one
`DeadlinePublisher`, which sends it at exactly t_ref + L: finishing early means waiting, so a
control loop sees a constant delay. Finishing after the deadline publishes at once with
`late = true` and counts a deadline miss.
"""

from __future__ import annotations

import copy
import heapq
import itertools
import logging
import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Protocol

import numpy as np

from fusion_node.alignment import AlignmentBuffer, InputSpec, Window
from fusion_node.clock import Clock, thread_cpu_ns
from fusion_node.errors import FusionError
from fusion_node.host.threads import ENGINE_RT_PRIORITY, raise_thread_priority
from fusion_node.protocol import Message, Prediction, encode

log = logging.getLogger(__name__)

# The publisher wakes this long before a deadline and sleeps precisely for the rest;
# a prediction scheduled inside this margin for an earlier deadline waits its turn.
_WAKE_MARGIN_NS = 1_000_000
# Bounded poll so a replay clock (whose time is not wall time) is re-checked often.
_MAX_WAIT_S = 0.005
# An inference running longer than this many declared latencies (and at least the floor)
# is hung: reported on node.health while it runs, its result discarded when it returns.
INFER_TIMEOUT_LATENCIES = 10
INFER_TIMEOUT_MIN_NS = 1_000_000_000


class Engine(Protocol):
    name: str
    model_hash: str

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class Binding(Protocol):
    """Maps windows to model feeds and model outputs to prediction fields."""

    spec: tuple[InputSpec, ...]

    def feeds(self, window: Window) -> dict[str, np.ndarray]: ...

    def decode(self, outputs: dict[str, np.ndarray],
               window: Window) -> tuple[dict[str, Any], dict[str, np.ndarray]]: ...


class PredictionSink(Protocol):
    """Where a runner hands its predictions: the deadline publisher, or a replay."""

    def schedule(self, msg: Message, deadline_ns: int) -> None: ...


class LatencyStats:
    """The most recent `size` values (ns) and their percentiles in ms."""

    def __init__(self, size: int = 4096) -> None:
        self._values: deque[int] = deque(maxlen=size)

    def add(self, value_ns: int) -> None:
        self._values.append(value_ns)

    def summary(self) -> dict[str, float]:
        if not self._values:
            return {"count": 0}
        values = np.fromiter(self._values, np.int64) / 1e6
        p50, p99 = np.percentile(values, [50, 99])
        return {"count": len(values), "p50_ms": round(float(p50), 4),
                "p99_ms": round(float(p99), 4), "max_ms": round(float(values.max()), 4)}


@dataclass
class EngineStats:
    ticks: int = 0
    published: int = 0
    missing_required: int = 0
    last_missing: str = ""
    deadline_misses: int = 0
    skipped_ticks: int = 0
    errors: int = 0
    last_error: str = ""
    timeouts: int = 0  # inferences that outlasted the timeout (also counted in errors)
    window_ns: LatencyStats = field(default_factory=LatencyStats)
    window_cpu_ns: LatencyStats = field(default_factory=LatencyStats)
    infer_ns: LatencyStats = field(default_factory=LatencyStats)
    ready_after_ref_ns: LatencyStats = field(default_factory=LatencyStats)

    def summary(self) -> dict[str, Any]:
        return {"ticks": self.ticks, "published": self.published,
                "missing_required": self.missing_required, "last_missing": self.last_missing,
                "deadline_misses": self.deadline_misses, "skipped_ticks": self.skipped_ticks,
                "errors": self.errors, "last_error": self.last_error,
                "timeouts": self.timeouts,
                "window": self.window_ns.summary(), "window_cpu": self.window_cpu_ns.summary(),
                "infer": self.infer_ns.summary(),
                "ready_after_ref": self.ready_after_ref_ns.summary()}


class DeadlinePublisher:
    """Owns the output socket; sends each message at its deadline, in deadline order."""

    def __init__(self, send: Callable[[list], None], clock: Clock,
                 on_published: Callable[[Prediction], None] | None = None) -> None:
        self._send = send
        self._clock = clock
        self._on_published = on_published
        self._queue: list[tuple[int, int, Message]] = []
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._stopping = False
        self.jitter_ns = LatencyStats()
        self.sent = 0
        self.priority = "default"

    def schedule(self, msg: Message, deadline_ns: int) -> None:
        with self._changed:
            heapq.heappush(self._queue, (deadline_ns, next(self._order), msg))
            self._changed.notify()

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify()

    def run_blocking(self) -> None:
        """Publish until stopped. Messages queued at stop still go out at their deadlines,
        at most one engine latency later: a prediction is never published early."""
        self.priority = raise_thread_priority()
        while True:
            with self._changed:
                if not self._queue:
                    if self._stopping:
                        return
                    self._changed.wait(_MAX_WAIT_S)
                    continue
                deadline_ns = self._queue[0][0]
                remaining = deadline_ns - self._clock.now_ns()
                if remaining > _WAKE_MARGIN_NS:
                    self._changed.wait(min(_MAX_WAIT_S, (remaining - _WAKE_MARGIN_NS) / 1e9))
                    continue
                _, _, msg = heapq.heappop(self._queue)
            self._clock.sleep_until(deadline_ns)
            self._publish(msg, deadline_ns)

    def _publish(self, msg: Message, deadline_ns: int) -> None:
        now = self._clock.now_ns()
        if isinstance(msg, Prediction):
            msg.t_publish_ns = now
            self.jitter_ns.add(now - deadline_ns)
        self._send(encode(msg))
        self.sent += 1
        if isinstance(msg, Prediction) and self._on_published is not None:
            self._on_published(msg)


class TickGrid:
    """t_ref of tick k = k · period on the absolute clock, exact in integer ns at any rate."""

    def __init__(self, rate_hz: float) -> None:
        self.period = Fraction(1_000_000_000) / Fraction(rate_hz).limit_denominator(1_000_000)

    def t_ref_ns(self, k: int) -> int:
        return int(k * self.period)

    def first_at_or_after(self, t_ns: int) -> int:
        return math.ceil(Fraction(t_ns) / self.period)


class EngineRunner:
    """One thread per engine, so an engine never runs concurrently with itself."""

    def __init__(self, *, name: str, topic: str, engine: Engine, binding: Binding,
                 rate_hz: float, latency_ns: int, align_delay_ns: int, clock: Clock,
                 buffer: AlignmentBuffer, sink: PredictionSink,
                 infer_timeout_ns: int | None = None) -> None:
        if not 0 <= align_delay_ns < latency_ns:
            raise FusionError(f"engine {name!r}: align delay {align_delay_ns} ns must be below "
                              f"its latency {latency_ns} ns")
        self.name = name
        self.topic = topic
        self.engine = engine
        self.binding = binding
        self.rate_hz = rate_hz
        self.latency_ns = latency_ns
        self.align_delay_ns = align_delay_ns
        self._grid = TickGrid(rate_hz)
        self._clock = clock
        self._buffer = buffer
        self._sink = sink
        self._stop = threading.Event()
        self._seq = 0
        self.stats = EngineStats()
        self.priority = "default"
        self.infer_timeout_ns = infer_timeout_ns or max(
            INFER_TIMEOUT_MIN_NS, INFER_TIMEOUT_LATENCIES * latency_ns)
        # Clock time the running inference started (0: none); read by health, lock-free.
        self._infer_started_ns = 0
        self._logged_error_types: set[str] = set()
        self.rehearsed = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def hang_status(self, now_ns: int) -> dict[str, Any]:
        """How long the running inference has taken, and whether that exceeds the timeout.

        A hung call (a driver or GPU stuck inside the backend) cannot be aborted from
        Python; this engine then publishes nothing until it returns, while the others go on.
        """
        started_ns = self._infer_started_ns
        running_ns = now_ns - started_ns if started_ns else 0
        return {"inferring_ms": round(running_ns / 1e6, 1),
                "hung": running_ns > self.infer_timeout_ns,
                "infer_timeout_ms": self.infer_timeout_ns / 1e6}

    def rehearse(self) -> None:
        """Cut a window at the clock's now and run feeds, inference and decoding on it,
        publishing and counting nothing.

        A tick's first window and feeds pay one-off costs (about 30 ms for the speech engine:
        first allocations, code paths taken once); paid here, on the engine's own thread, they
        do not make the first scheduled tick late. The binding's state (a latched command, a
        recurrent model's state) is left untouched: the rehearsal works on a copy of it, and a
        recording node does not log its window cut, which a replay would tick.
        """
        try:
            window = self._buffer.unrecorded_window(self._clock.now_ns(), self.binding.spec)
            binding = copy.deepcopy(self.binding)
            binding.decode(self.engine.infer(binding.feeds(window)), window)
        except Exception as exc:  # noqa: BLE001 - a failure here shows again on a real tick
            log.info("engine %s: rehearsal tick failed (%s); its first tick pays the one-off "
                     "costs", self.name, exc)
        finally:
            self.rehearsed.set()

    def run_blocking(self, start_ns: int | None = None) -> None:
        """Rehearse once, then tick until stopped."""
        self.priority = raise_thread_priority(ENGINE_RT_PRIORITY)
        self.rehearse()
        k = self._grid.first_at_or_after(self._clock.now_ns() if start_ns is None else start_ns)
        while not self._stop.is_set():
            t_ref_ns = self._grid.t_ref_ns(k)
            self._clock.sleep_until(t_ref_ns + self.align_delay_ns)
            if self._stop.is_set():
                return
            self.tick(t_ref_ns)
            k += 1
            # Fell behind by more than a whole latency: skip to the next tick that can still
            # meet its deadline instead of publishing a backlog of stale predictions.
            now = self._clock.now_ns()
            while self._grid.t_ref_ns(k) + self.latency_ns < now:
                k += 1
                self.stats.skipped_ticks += 1

    def tick(self, t_ref_ns: int) -> Prediction | None:
        """Run one tick for sensor time t_ref; returns the scheduled prediction, if any."""
        self.stats.ticks += 1
        t_window_start = self._clock.now_ns()
        # CPU time is the window's cost; wall time adds waits for the GIL and the cores.
        cpu_start_ns = thread_cpu_ns()
        window = self._buffer.window(t_ref_ns, self.binding.spec)
        self.stats.window_cpu_ns.add(thread_cpu_ns() - cpu_start_ns)
        self.stats.window_ns.add(self._clock.now_ns() - t_window_start)
        if window.missing_required:
            self.stats.missing_required += 1
            self.stats.last_missing = "; ".join(
                f"{s}: {window.missing[s]}" for s in window.missing_required)
            return None
        try:
            feeds = self.binding.feeds(window)
            t_window_ns = self._clock.now_ns()
            self._infer_started_ns = t_window_ns
            try:
                outputs = self.engine.infer(feeds)
            finally:
                self._infer_started_ns = 0
            t_infer_end_ns = self._clock.now_ns()
            if t_infer_end_ns - t_window_ns > self.infer_timeout_ns:
                self.stats.timeouts += 1
                raise FusionError(
                    f"inference took {(t_infer_end_ns - t_window_ns) / 1e6:.0f} ms, over the "
                    f"{self.infer_timeout_ns / 1e6:.0f} ms timeout; result discarded")
            fields, arrays = self.binding.decode(outputs, window)
        except Exception as exc:  # noqa: BLE001 - a backend or binding bug must not end ticking
            self._count_error(t_ref_ns, exc)
            return None
        deadline_ns = t_ref_ns + self.latency_ns
        ready_ns = self._clock.now_ns()
        late = ready_ns > deadline_ns
        if late:
            self.stats.deadline_misses += 1
        self.stats.infer_ns.add(t_infer_end_ns - t_window_ns)
        self.stats.ready_after_ref_ns.add(ready_ns - t_ref_ns)
        prediction = Prediction(
            stream=self.topic, seq=self._seq, t_ref_ns=t_ref_ns, deadline_ns=deadline_ns,
            engine=self.name, model_hash=self.engine.model_hash, mask=dict(window.mask),
            fields=fields, arrays=arrays, late=late,
            trace={"t_capture_ns": window.newest_capture_ns,
                   "t_receive_ns": window.newest_receive_ns,
                   "t_window_start_ns": t_window_start, "t_infer_start_ns": t_window_ns,
                   "t_infer_end_ns": t_infer_end_ns, "t_ready_ns": ready_ns})
        self._seq += 1
        self.stats.published += 1
        self._sink.schedule(prediction, deadline_ns)
        return prediction

    def _count_error(self, t_ref_ns: int, exc: Exception) -> None:
        self.stats.errors += 1
        if isinstance(exc, FusionError):
            self.stats.last_error = str(exc)
            log.warning("engine %s at t_ref %d: %s", self.name, t_ref_ns, exc)
            return
        # Not one of ours: a bug or an unwrapped backend error. The traceback once per type.
        kind = type(exc).__name__
        self.stats.last_error = f"{kind}: {exc}"
        log.warning("engine %s at t_ref %d: %s", self.name, t_ref_ns, self.stats.last_error,
                    exc_info=kind not in self._logged_error_types)
        self._logged_error_types.add(kind)
