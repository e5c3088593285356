"""One-way transport latency: the wire protocol against raw pyzmq, between two processes.

A spawned sender process binds a PUB socket and, for each message kind, alternates message by
message between two paths on the same socket:

  ours  stamp → build the message → `protocol.encode` → `send_multipart(copy=False)`
        → `recv_multipart(copy=False)` → `protocol.decode` (full validation) → stamp
  raw   stamp → `[topic, 16-byte struct header, raw payload]` with `copy=False`
        → `recv_multipart(copy=False)` → unpack the header, view the payload → stamp

Both stamps are CLOCK_MONOTONIC, which every process on the host shares, so the difference is
the one-way latency. Messages are paced (one every 1-2 ms) so the figures measure latency,
not queueing; the first `warmup` messages of each path are discarded. The receiver is a
plain thread blocked in `recv_multipart`, as a control loop would be (a `zmq.asyncio`
receiver adds 60-90 µs per message on the 2-core machines this was planned on).

Run `python -m fusion_node.bench_transport` (or `fusion-node bench transport --json`); it
prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from fusion_node.clock import MonotonicClock
from fusion_node.errors import FusionError
from fusion_node.protocol import AudioChunk, Frame, JointState, Message, decode, encode

KINDS = ("frame", "audio", "joints")
# Frames are ~0.9 MB and take ~0.7 ms to cross, so they get a wider slot than small messages.
DEFAULT_INTERVALS_US = {"frame": 2000, "audio": 1000, "joints": 1000}
# The project's targets for ours / raw (p50); reported for reading, never enforced here.
TARGET_RATIO = {"frame": 1.2, "audio": 1.3, "joints": 1.3}
JOINT_NAMES = tuple(f"joint{i}" for i in range(7))
SAMPLE_RATE = 16_000

_RAW_HEADER = struct.Struct("<qq")  # seq, t_send_ns
_PROBE = b"bench.probe"
_END = b"bench.end"
_STREAMS = {"frame": "camera.bench", "audio": "audio.bench", "joints": "joints.bench"}
_RAW_TOPICS = {"frame": b"raw.frame", "audio": b"raw.audio", "joints": b"raw.joints"}
_KIND_OF_STREAM = {stream: kind for kind, stream in _STREAMS.items()}
_KIND_OF_RAW = {topic: kind for kind, topic in _RAW_TOPICS.items()}
_RECV_TIMEOUT_MS = 10_000
_START_TIMEOUT_S = 60.0


def _payload(kind: str) -> np.ndarray:
    """The array each kind carries: what the raw path sends and ours wraps."""
    rng = np.random.default_rng(0)
    if kind == "frame":
        return rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    if kind == "audio":  # 20 ms mono at 16 kHz
        return rng.integers(-2000, 2000, size=(SAMPLE_RATE // 50, 1), dtype=np.int16)
    return rng.standard_normal((3, len(JOINT_NAMES)))  # position, velocity, effort


def _message(kind: str, array: np.ndarray, seq: int, t_ns: int) -> Message:
    stream = _STREAMS[kind]
    if kind == "frame":
        return Frame(stream, seq, t_ns, array, "rgb8")
    if kind == "audio":
        return AudioChunk(stream, seq, t_ns, SAMPLE_RATE, seq * len(array), array)
    return JointState(stream, seq, t_ns, JOINT_NAMES, array[0], array[1], array[2])


def _send_blocking(endpoint: str, count: int, warmup: int, intervals_us: dict[str, int],
                   ready: Any) -> None:
    """Sender process: bind, wait for the subscriber, then send the interleaved sequence."""
    clock = MonotonicClock(spin_ns=0)  # no spinning: 2 cores are shared with the receiver
    context = zmq.Context()
    socket = context.socket(zmq.PUB)
    socket.setsockopt(zmq.SNDHWM, 0)  # paced and bounded: never drop a measured message
    socket.setsockopt(zmq.LINGER, 5000)
    socket.bind(endpoint)
    try:
        # PUB/SUB slow joiner: anything sent before the subscription arrives is lost.
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not ready.wait(0.01):
            if time.monotonic() > deadline:
                raise FusionError(f"bench receiver never subscribed to {endpoint}")
            socket.send(_PROBE)
        for kind in KINDS:
            array = _payload(kind)
            raw_topic = _RAW_TOPICS[kind]
            interval_ns = intervals_us[kind] * 1000
            next_ns = clock.now_ns() + interval_ns
            for i in range(2 * (warmup + count)):
                clock.sleep_until(next_ns)
                # After a pre-emption, skip the missed slots instead of sending a burst.
                next_ns = max(next_ns + interval_ns, clock.now_ns())
                seq = i // 2
                if i % 2 == 0:
                    t_ns = clock.now_ns()
                    socket.send_multipart(encode(_message(kind, array, seq, t_ns)), copy=False)
                else:
                    t_ns = clock.now_ns()
                    # pyzmq's own idiom: hand the C-contiguous array over with copy=False.
                    socket.send_multipart([raw_topic, _RAW_HEADER.pack(seq, t_ns), array],
                                          copy=False)
        socket.send(_END)
    finally:
        socket.close()
        context.term()


class _Receiver:
    """Blocking receive loop on its own thread; records latencies per kind and path."""

    def __init__(self, context: zmq.Context, endpoint: str, warmup: int, ready: Any) -> None:
        self._socket = context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.RCVHWM, 0)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.RECONNECT_IVL, 10)  # the sender binds after we connect
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.connect(endpoint)
        self._warmup = warmup
        self._ready = ready
        self._shapes = {kind: _payload(kind).shape for kind in KINDS}
        self._dtypes = {kind: _payload(kind).dtype for kind in KINDS}
        self.latencies_ns: dict[str, dict[str, list[int]]] = {
            kind: {"ours": [], "raw": []} for kind in KINDS}
        self.error: str = ""
        self.finished = False
        self._thread = threading.Thread(target=self._run_blocking, name="bench-receiver",
                                         daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)

    def _run_blocking(self) -> None:
        # The thread owns the socket from here on and closes it; terminating the context
        # from the main thread wakes a blocked recv with ETERM.
        try:
            self._wait_for_probe_blocking()
            self._socket.setsockopt(zmq.RCVTIMEO, _RECV_TIMEOUT_MS)
            self._loop_blocking()
        except zmq.Again:
            self.error = f"no message for {_RECV_TIMEOUT_MS} ms"
        except Exception as exc:  # noqa: BLE001 - reported by run_transport_bench, not lost
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._socket.close(linger=0)

    def _wait_for_probe_blocking(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._socket.poll(100) and self._socket.recv() == _PROBE:
                self._ready.set()
                return
        raise TimeoutError("no probe from the bench sender")

    def _loop_blocking(self) -> None:
        socket, warmup, latencies = self._socket, self._warmup, self.latencies_ns
        while True:
            parts = socket.recv_multipart(copy=False)
            topic = parts[0].bytes
            raw_kind = _KIND_OF_RAW.get(topic)
            if raw_kind is not None:
                seq, t_send_ns = _RAW_HEADER.unpack_from(parts[1].buffer)
                # What a hand-written subscriber does: view the payload, trust the sender.
                np.frombuffer(parts[2], self._dtypes[raw_kind]).reshape(self._shapes[raw_kind])
                t_recv_ns = time.monotonic_ns()
                if seq >= warmup:
                    latencies[raw_kind]["raw"].append(t_recv_ns - t_send_ns)
            elif topic in (_END, _PROBE):
                if topic == _END:
                    self.finished = True
                    return
            else:
                msg = decode(parts)
                t_recv_ns = time.monotonic_ns()
                if msg.seq >= warmup:
                    latencies[_KIND_OF_STREAM[msg.stream]]["ours"].append(
                        t_recv_ns - msg.t_capture_ns)


def _percentiles_us(latencies_ns: list[int]) -> dict[str, Any]:
    values = np.asarray(latencies_ns, dtype=np.float64) / 1000.0
    p50, p99 = np.percentile(values, [50, 99]) if len(values) else (math.nan, math.nan)
    return {"count": len(values), "p50_us": round(float(p50), 1), "p99_us": round(float(p99), 1)}


def run_transport_bench(count: int = 2000, warmup: int = 100, endpoint: str | None = None,
                        intervals_us: dict[str, int] | None = None) -> dict[str, Any]:
    """Measure one-way latency of ours vs raw pyzmq per message kind; return a JSON-able dict.

    `count` and `warmup` are per kind and per path. `endpoint` defaults to an ipc:// socket in
    a temporary directory. Takes about 2 × (count + warmup) × (2 + 1 + 1) ms plus process
    start-up (about 18 s at the defaults).
    """
    if count < 1 or warmup < 0:
        raise ValueError(f"count must be >= 1 and warmup >= 0, got {count} and {warmup}")
    intervals = {**DEFAULT_INTERVALS_US, **(intervals_us or {})}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fusion-bench-") as tmp:
        endpoint = endpoint or f"ipc://{Path(tmp) / 'bench.sock'}"
        spawn = mp.get_context("spawn")  # a fresh interpreter, as a real driver process is
        ready = spawn.Event()
        context = zmq.Context()
        receiver = _Receiver(context, endpoint, warmup, ready)
        sender = spawn.Process(target=_send_blocking, name="bench-sender",
                               args=(endpoint, count, warmup, intervals, ready))
        try:
            receiver.start()
            sender.start()
            expected_s = 2 * (count + warmup) * sum(intervals.values()) / 1e6
            sender.join(_START_TIMEOUT_S + 2 * expected_s)
            receiver.join(_RECV_TIMEOUT_MS / 1000 + 1)
        finally:
            if sender.is_alive():
                sender.terminate()
                sender.join(5)
            context.term()
    if sender.exitcode != 0 or not receiver.finished:
        raise FusionError(f"transport bench failed: sender exit code {sender.exitcode}, "
                          f"receiver {receiver.error or 'did not finish'}")

    kinds: dict[str, Any] = {}
    for kind in KINDS:
        ours = _percentiles_us(receiver.latencies_ns[kind]["ours"])
        raw = _percentiles_us(receiver.latencies_ns[kind]["raw"])
        kinds[kind] = {
            "payload_bytes": int(_payload(kind).nbytes),
            "interval_us": intervals[kind],
            "ours": ours,
            "raw": raw,
            "ratio_p50": round(ours["p50_us"] / raw["p50_us"], 3),
            "ratio_p99": round(ours["p99_us"] / raw["p99_us"], 3),
            "target_ratio": TARGET_RATIO[kind],
        }
    return {
        "bench": "transport",
        "endpoint": endpoint.split("://", 1)[0],
        "count": count,
        "warmup": warmup,
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "elapsed_s": round(time.monotonic() - started, 2),
        "kinds": kinds,
    }


def main(argv: list[str] | None = None) -> None:
    """Print the bench result as one JSON object."""
    parser = argparse.ArgumentParser(prog="python -m fusion_node.bench_transport",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="messages per kind and path")
    parser.add_argument("--warmup", type=int, default=100, help="discarded, per kind and path")
    parser.add_argument("--endpoint", help="default: ipc:// in a temporary directory")
    args = parser.parse_args(argv)
    print(json.dumps(run_transport_bench(args.count, args.warmup, args.endpoint), indent=2))


if __name__ == "__main__":
    main()
