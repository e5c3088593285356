"""Remote clocks: map stamps from a source on another clock onto the node's clock.

NTP-style, as Lab Streaming Layer does it: the node sends a burst of requests to the source's
`ClockResponder`; each exchange gives local send/receive times t0, t3 and remote receive/send
times t1, t2. The sample with the smallest round trip of a burst is kept (queueing only adds
delay), and offset + drift are fitted over a sliding window of kept samples. Each sample's
offset is off by at most half its round trip (the delay asymmetry), which bounds the error.

    python -m fusion_node.remote_clock serve ENDPOINT   # on the remote source
"""

from __future__ import annotations

import argparse
import json
import math
import random
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from fusion_node.clock import Clock, MonotonicClock
from fusion_node.errors import CalibrationError, ConfigError
from fusion_node.security import ClientKeys, CurveServer, check_endpoint, is_loopback_or_ipc

_REQUEST = struct.Struct("<Q")  # sequence number
_REPLY = struct.Struct("<Qqq")  # sequence number, t1 (remote receive), t2 (remote send)
DEFAULT_BURST = 16
DEFAULT_PERIOD_NS = 250_000_000
DEFAULT_WINDOW_NS = 60_000_000_000
DEFAULT_TIMEOUT_MS = 200
# Below this many samples the spread of the fit residuals says little; trust only the bound.
_MIN_STAT_SAMPLES = 8
# Drift is fitted once the window spans this long; before, a drift error would dominate.
_MIN_DRIFT_SPAN_S = 2.0
_SIGMAS = 3.5
# How far the drift may be off before one is fitted: two uncalibrated crystals each within
# ±100 ppm; a calibrated drift (calibration.yaml) may have moved with temperature since.
_UNFITTED_DRIFT_BOUND = 200e-6
_CALIBRATED_DRIFT_BOUND = 5e-6
# A burst whose offset disagrees with the current mapping by more than the mapping's bound,
# half its round trip and this margin is a jump of the remote clock (a reboot, a step by the
# source's NTP): the fit restarts from that burst instead of averaging the two clocks for a
# whole window. Meanwhile the node refuses what the stale mapping puts in the future
# (`too_new`) and never uses what it puts in the past.
_JUMP_MARGIN_NS = 5_000_000
# Drift change the linear fit cannot model (temperature, ageing) while a source is silent:
# crystal oscillators stay within about 1 ppm over minutes at a steady temperature.
DRIFT_WANDER = 1e-6


class ClockError(CalibrationError):
    """A remote clock cannot be reached or gave a malformed reply."""


@dataclass(frozen=True, slots=True)
class ClockMapping:
    """remote = local + offset_ns + drift * (local - t_ref_local_ns); immutable, so the
    receive thread reads a consistent mapping without a lock."""

    t_ref_local_ns: int
    offset_ns: int
    drift: float  # d(offset)/d(local): 50 ppm is 50e-6
    uncertainty_ns: int  # bound on the mapping error at t_ref_local_ns (the latest sample)
    samples: int
    min_rtt_ns: int
    drift_uncertainty: float = 0.0  # bound on the drift error, same unit as drift
    drift_wander: float = DRIFT_WANDER  # bound on unmodelled drift change since the fit

    def to_local_ns(self, t_remote_ns: int) -> int:
        return self.t_ref_local_ns + round(
            (t_remote_ns - self.t_ref_local_ns - self.offset_ns) / (1.0 + self.drift))

    def uncertainty_at_ns(self, t_local_ns: int) -> int:
        """Bound on the mapping error at `t_local_ns`: the fit's, plus what the drift's error
        and its unmodelled change add since the latest sample. It grows while the source is
        silent, so a stale mapping never claims the accuracy of a fresh one."""
        elapsed_s = abs(t_local_ns - self.t_ref_local_ns) / 1e9
        return self.uncertainty_ns + round(
            (self.drift_uncertainty + self.drift_wander) * elapsed_s * 1e9)

    def summary(self, now_ns: int) -> dict[str, Any]:
        return {"offset_ms": round(self.offset_ns / 1e6, 4),
                "drift_ppm": round(self.drift * 1e6, 3),
                "uncertainty_ms": round(self.uncertainty_at_ns(now_ns) / 1e6, 4),
                "fit_uncertainty_ms": round(self.uncertainty_ns / 1e6, 4),
                "drift_uncertainty_ppm": round(self.drift_uncertainty * 1e6, 3),
                "age_s": round((now_ns - self.t_ref_local_ns) / 1e9, 3),
                "samples": self.samples, "min_rtt_ms": round(self.min_rtt_ns / 1e6, 4)}


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request/reply: local send t0, remote receive t1, remote send t2, local receive t3."""

    t0_ns: int
    t1_ns: int
    t2_ns: int
    t3_ns: int

    @property
    def rtt_ns(self) -> int:
        return (self.t3_ns - self.t0_ns) - (self.t2_ns - self.t1_ns)

    @property
    def offset_ns(self) -> float:
        return ((self.t1_ns - self.t0_ns) + (self.t2_ns - self.t3_ns)) / 2

    @property
    def t_local_ns(self) -> int:
        return (self.t0_ns + self.t3_ns) // 2


class ClockEstimator:
    """Offset + drift from bursts of exchanges, fitted over a sliding window."""

    def __init__(self, window_ns: int = DEFAULT_WINDOW_NS, initial_drift: float = 0.0,
                 drift_wander: float = DRIFT_WANDER) -> None:
        self._window_ns = window_ns
        self._initial_drift = initial_drift  # a calibrated drift, used until one can be fitted
        self._initial_drift_bound = (_CALIBRATED_DRIFT_BOUND if initial_drift
                                     else _UNFITTED_DRIFT_BOUND)
        self._drift_wander = drift_wander
        self._kept: deque[Exchange] = deque()
        self.mapping: ClockMapping | None = None
        self.jumps = 0  # times the remote clock jumped and the fit started again

    def add_burst(self, exchanges: list[Exchange]) -> ClockMapping | None:
        """Keep the burst's minimum-round-trip exchange and refit; the new mapping."""
        if not exchanges:
            return self.mapping
        best = min(exchanges, key=lambda e: e.rtt_ns)
        if self.mapping is not None and self._jumped(self.mapping, best):
            self._kept.clear()
            self.jumps += 1
        self._kept.append(best)
        while self._kept and best.t_local_ns - self._kept[0].t_local_ns > self._window_ns:
            self._kept.popleft()
        self.mapping = self._fit(best.t_local_ns)
        return self.mapping

    @staticmethod
    def _jumped(mapping: ClockMapping, exchange: Exchange) -> bool:
        predicted_ns = mapping.offset_ns + mapping.drift * (exchange.t_local_ns
                                                            - mapping.t_ref_local_ns)
        allowed_ns = (mapping.uncertainty_at_ns(exchange.t_local_ns)
                      + max(exchange.rtt_ns, 0) / 2 + _JUMP_MARGIN_NS)
        return abs(exchange.offset_ns - predicted_ns) > allowed_ns

    def _fit(self, t_ref_ns: int) -> ClockMapping:
        kept = self._kept
        n = len(kept)
        x = [(e.t_local_ns - t_ref_ns) / 1e9 for e in kept]  # s; small numbers keep precision
        y = [e.offset_ns for e in kept]
        half_rtt = [max(e.rtt_ns, 0) / 2 for e in kept]
        x_mean = sum(x) / n
        sxx = sum((xi - x_mean) ** 2 for xi in x)
        if x[0] > -_MIN_DRIFT_SPAN_S:
            # Too short a span to fit drift: the latest sample alone, whose error is at most
            # half its round trip, with the calibrated drift.
            latest = kept[-1]
            return ClockMapping(t_ref_ns, round(latest.offset_ns), self._initial_drift,
                                round(half_rtt[-1]), n, round(2 * min(half_rtt)),
                                self._initial_drift_bound, self._drift_wander)
        y_mean = sum(y) / n
        slope = sum((xi - x_mean) * (yi - y_mean) for xi, yi in zip(x, y)) / sxx  # ns per s
        offset = y_mean - slope * x_mean
        # The fit at x = 0 is sum(w_i * y_i); each y_i errs by at most half_rtt_i, hence the
        # hard bound. Most of the asymmetry errors cancel, so with enough samples the spread
        # of the residuals gives a much tighter (3.5 sigma, more with few samples) figure.
        weights = [1 / n + (0 - x_mean) * (xi - x_mean) / sxx for xi in x]
        bound = sum(abs(w) * h for w, h in zip(weights, half_rtt))
        # The slope is sum((x_i - x_mean) / sxx * y_i): the same two bounds for the drift.
        slope_bound = sum(abs(xi - x_mean) / sxx * h for xi, h in zip(x, half_rtt))
        uncertainty, slope_uncertainty = bound, slope_bound
        if n >= _MIN_STAT_SAMPLES:
            ssr = sum((yi - offset - slope * xi) ** 2 for xi, yi in zip(x, y))
            sigmas = _SIGMAS + 10 / (n - 2)
            sigma = math.sqrt(ssr / (n - 2) * (1 / n + x_mean ** 2 / sxx))
            uncertainty = min(bound, sigmas * sigma)
            slope_uncertainty = min(slope_bound, sigmas * math.sqrt(ssr / (n - 2) / sxx))
        return ClockMapping(t_ref_ns, round(offset), slope / 1e9, round(uncertainty), n,
                            round(2 * min(half_rtt)), slope_uncertainty / 1e9,
                            self._drift_wander)


class ClockResponder:
    """Answers clock requests with this host's time; run it on the remote source.

    `delay_ns`, when given, draws an extra one-way delay (ns) before stamping the request and
    after stamping the reply: a simulated network for `bench clock` and the tests.

    Beyond loopback it needs `keys`: the remote source is then a CURVE client of the node
    (its own client key, the node's public key; docs/security.md)."""

    def __init__(self, context: zmq.Context, endpoint: str, clock: Clock,
                 delay_ns: Callable[[], int] | None = None,
                 keys: ClientKeys | None = None) -> None:
        check_endpoint(endpoint, keys is not None, "clock responder endpoint")
        self._socket = context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            keys.apply(self._socket)
        try:
            self._socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self._socket.close()
            raise ClockError(f"clock responder cannot bind {endpoint!r}: {exc}") from None
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._clock = clock
        self._delay_ns = delay_ns

    def serve_blocking(self, stop: threading.Event) -> None:
        """Answer requests until `stop` is set; malformed requests are ignored."""
        while not stop.is_set():
            if not self._socket.poll(50):
                continue
            identity, request = self._socket.recv_multipart()
            if len(request) != _REQUEST.size:
                continue
            if self._delay_ns is not None:
                _sleep_ns(self._delay_ns())
            t1_ns = self._clock.now_ns()
            (seq,) = _REQUEST.unpack(request)
            reply = _REPLY.pack(seq, t1_ns, self._clock.now_ns())
            if self._delay_ns is not None:
                _sleep_ns(self._delay_ns())
            self._socket.send_multipart([identity, reply])

    def close(self) -> None:
        self._socket.close()


def _sleep_ns(duration_ns: int) -> None:
    end_ns = time.monotonic_ns() + duration_ns
    while time.monotonic_ns() < end_ns:  # sub-ms sleeps: spin, time.sleep is too coarse
        pass


class ClockTracker:
    """Node side: a burst of exchanges with a remote responder every `period_ns`, feeding a
    `ClockEstimator`; `mapping` is the latest (None until the first burst is answered)."""

    def __init__(self, context: zmq.Context, endpoint: str, clock: Clock, *,
                 burst: int = DEFAULT_BURST, period_ns: int = DEFAULT_PERIOD_NS,
                 window_ns: int = DEFAULT_WINDOW_NS, timeout_ms: int = DEFAULT_TIMEOUT_MS,
                 initial_drift: float = 0.0, curve: CurveServer | None = None) -> None:
        self.endpoint = endpoint
        self._socket = context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        # A responder on another host must prove an allowed client key.
        self._curve = curve if curve is not None and not is_loopback_or_ipc(endpoint) else None
        if self._curve is not None:
            self._curve.protect(self._socket, "clock")
        self._socket.connect(endpoint)
        self._clock = clock
        self._burst = burst
        self.period_ns = period_ns
        self._timeout_ms = timeout_ms
        self._seq = 0
        self.estimator = ClockEstimator(window_ns, initial_drift)
        self.timeouts = 0

    @property
    def mapping(self) -> ClockMapping | None:
        return self.estimator.mapping

    def exchange_blocking(self) -> Exchange | None:
        """One request/reply; None if no reply came within the timeout."""
        self._seq += 1
        t0_ns = self._clock.now_ns()
        self._socket.send(_REQUEST.pack(self._seq))
        deadline_ns = t0_ns + self._timeout_ms * 1_000_000
        while (left_ms := (deadline_ns - self._clock.now_ns()) // 1_000_000) > 0:
            if not self._socket.poll(left_ms):
                break
            reply = self._socket.recv()
            t3_ns = self._clock.now_ns()
            if len(reply) != _REPLY.size:
                raise ClockError(f"clock responder {self.endpoint!r} sent a {len(reply)}-byte "
                                 f"reply, expected {_REPLY.size}")
            seq, t1_ns, t2_ns = _REPLY.unpack(reply)
            if seq == self._seq:  # a late reply to an earlier request is skipped
                return Exchange(t0_ns, t1_ns, t2_ns, t3_ns)
        self.timeouts += 1
        return None

    def burst_blocking(self) -> ClockMapping | None:
        exchanges = []
        for _ in range(self._burst):
            exchange = self.exchange_blocking()
            if exchange is None:  # lost or unreachable: retry next period, not 16 timeouts
                break
            exchanges.append(exchange)
        return self.estimator.add_burst(exchanges)

    def run_blocking(self, running: threading.Event) -> None:
        """Bursts every period while `running` is set."""
        next_ns = self._clock.now_ns()
        while running.is_set():
            self.burst_blocking()
            next_ns += self.period_ns
            while running.is_set() and self._clock.now_ns() < next_ns:
                time.sleep(min(0.05, max(0, next_ns - self._clock.now_ns()) / 1e9))

    def close(self) -> None:
        if self._curve is not None:
            self._curve.unprotect(self._socket)
        self._socket.close()


class SimulatedRemoteClock:
    """This host's monotonic clock seen through an offset and a drift: a stand-in remote."""

    def __init__(self, offset_ns: int, drift: float) -> None:
        self.offset_ns = offset_ns
        self.drift = drift

    def now_ns(self) -> int:
        return self.remote_of(time.monotonic_ns())

    def remote_of(self, t_local_ns: int) -> int:
        return self.offset_ns + round(t_local_ns * (1.0 + self.drift))

    def local_of(self, t_remote_ns: int) -> int:
        return round((t_remote_ns - self.offset_ns) / (1.0 + self.drift))

    def sleep_until(self, t_ns: int) -> None:
        MonotonicClock().sleep_until(self.local_of(t_ns))


def uniform_delay(low_ns: int, high_ns: int, seed: int) -> Callable[[], int]:
    """Seeded one-way delays, uniform in [low_ns, high_ns], for a simulated network."""
    rng = random.Random(seed)
    return lambda: rng.randint(low_ns, high_ns)


def _serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusion_node.remote_clock")
    parser.add_argument("command", choices=("serve",))
    parser.add_argument("endpoint", help="bind endpoint, e.g. tcp://0.0.0.0:5601")
    parser.add_argument("--sim-offset-s", type=float, help="simulate a clock this far ahead")
    parser.add_argument("--sim-drift-ppm", type=float, default=0.0)
    parser.add_argument("--sim-delay-ms", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="simulate random one-way delays in this range")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--client-key", help="this source's .key_secret (needed beyond "
                        "loopback; docs/security.md)")
    parser.add_argument("--server-key", help="the node's public .key")
    args = parser.parse_args(argv)
    clock: Clock = MonotonicClock()
    if args.sim_offset_s is not None:
        clock = SimulatedRemoteClock(round(args.sim_offset_s * 1e9), args.sim_drift_ppm * 1e-6)
    delay = None
    if args.sim_delay_ms:
        delay = uniform_delay(round(args.sim_delay_ms[0] * 1e6), round(args.sim_delay_ms[1] * 1e6),
                              args.seed)
    context = zmq.Context()
    stop = threading.Event()
    try:
        if (args.client_key is None) != (args.server_key is None):
            raise ConfigError("--client-key and --server-key go together")
        keys = (ClientKeys.load(args.client_key, args.server_key)
                if args.client_key is not None else None)
        responder = ClockResponder(context, args.endpoint, clock, delay, keys=keys)
    except (ClockError, ConfigError) as exc:
        context.term()
        print(f"fusion_node.remote_clock: error: {exc}", file=sys.stderr)
        return 1
    # The bound endpoint (a wildcard port resolved) on the first line, for whoever started us.
    print(json.dumps({"endpoint": responder.endpoint}), flush=True)
    try:
        responder.serve_blocking(stop)
    except KeyboardInterrupt:
        pass
    finally:
        responder.close()
        context.term()
    return 0


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1:]))
