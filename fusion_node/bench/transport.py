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

A second part (`run_frame_bench`, the result's `frames`) compares, interleaved, raw pyzmq,
ours and the shared-memory path (fusion_node.shm) for 640x480x3 and 1280x720x3 frames, to
one and to three subscriber processes: one-way latency of paced frames, and throughput of
back-to-back bursts. Beside them, `floor` sends raw pyzmq's header alone: the wake-ups that
any path signalling through ZeroMQ pays, below which no shared-memory path can go.

Run `python -m fusion_node.bench.transport` (or `fusion-node bench transport --json`); it
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
from queue import Empty
from typing import Any

import numpy as np
import zmq

from fusion_node.clock import MonotonicClock
from fusion_node.errors import FusionError
from fusion_node.progress import progress
from fusion_node.protocol import AudioChunk, Frame, JointState, Message, decode, encode
from fusion_node.shm import ShmConfig, ShmReader, ShmWriter

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


# -- frames: raw pyzmq vs ours vs shared memory, one and three subscriber processes -----------

FRAME_SHAPES = {"640x480x3": (480, 640, 3), "1280x720x3": (720, 1280, 3)}
# shm: `Publisher.send` of an existing array (one copy into the ring, timed); shm_loan: the
# producer fills a loaned slot before stamping, as the camera driver's decoder does;
# floor: raw pyzmq's topic and 24-byte header alone, no payload: what any path that signals
# through ZeroMQ costs at least (thread wake-ups), the shared-memory paths' lower bound.
FRAME_PATHS = ("raw", "ours", "shm", "shm_loan", "floor")
FRAME_SUBSCRIBERS = (1, 3)
# Paced so that three receivers on two cores keep up: latency, not queueing.
FRAME_INTERVALS_US = {"640x480x3": 3000, "1280x720x3": 6000}
# The targets for the 640x480 frame: shm/raw median latency, and throughput with 3.
SHM_TARGETS = {"latency_ratio_p50_max": 0.5, "throughput_ratio_3_subscribers_min": 2.0}
BURST_FRAMES = 50
BURST_ROUNDS = 15
# Throughput is steady state: one round first (discarded) puts every path's buffers in
# place (shared-memory slots are faulted in on first write, allocators grow their caches),
# and each round starts once the previous round's leases have expired, as they have for a
# camera publishing at a rate its ring sustains. Fallbacks are still counted.
BURST_WARMUP_ROUNDS = 1
# The bench's receivers drop each frame at once, so a short lease suffices; a node keeps
# frames ~2 s and uses the default lease (fusion_node.shm).
BENCH_SHM = ShmConfig(slots=2 * BURST_FRAMES, lease_ms=100)
_FRAME_TOPIC = {"raw": b"raw.frame", "ours": b"camera.ours", "shm": b"camera.shm",
                "shm_loan": b"camera.loan", "floor": b"raw.floor"}
_PATH_OF_TOPIC = {topic: path for path, topic in _FRAME_TOPIC.items()}
_BURST_END = b"bench.burst"
_FRAME_HEADER = struct.Struct("<qqq")  # seq, t_send_ns, size index
_BURST_SEQ = 1 << 40  # burst frames count from here: throughput only, no latency


def _frame_sender_blocking(endpoint: str, ack_endpoint: str, subscribers: int, count: int,
                           warmup: int, ready: Any, result: Any) -> None:
    """Sender process: paced interleaved frames per size, then back-to-back bursts per path."""
    clock = MonotonicClock(spin_ns=0)
    context = zmq.Context()
    socket = context.socket(zmq.PUB)
    socket.setsockopt(zmq.SNDHWM, 0)
    socket.setsockopt(zmq.LINGER, 5000)
    socket.bind(endpoint)
    acks = context.socket(zmq.PULL)
    acks.setsockopt(zmq.LINGER, 0)
    acks.bind(ack_endpoint)
    writer = ShmWriter(BENCH_SHM)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in FRAME_SHAPES.values()]

    def send(path: str, index: int, seq: int) -> None:
        image = frames[index]
        if path == "shm_loan":
            loaned = writer.loan(_FRAME_TOPIC[path], image.shape, image.dtype)
            if loaned is not None:
                np.copyto(loaned, image)  # the producer's own write, before capture time
                image = loaned
        t_ns = clock.now_ns()
        if path == "raw":
            socket.send_multipart([_FRAME_TOPIC["raw"], _FRAME_HEADER.pack(seq, t_ns, index),
                                   image], copy=False)
            return
        if path == "floor":
            socket.send_multipart([_FRAME_TOPIC["floor"], _FRAME_HEADER.pack(seq, t_ns, index)])
            return
        parts = encode(Frame(_FRAME_TOPIC[path].decode(), seq, t_ns, image))
        socket.send_multipart(parts if path == "ours" else writer.wrap(parts), copy=False)

    bursts: dict[str, dict[str, list[int]]] = {}
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        ready_count = 0
        while ready_count < subscribers:
            if time.monotonic() > deadline:
                raise FusionError(f"bench receivers never subscribed to {endpoint}")
            socket.send(_PROBE)
            if acks.poll(10):
                acks.recv()
                ready_count += 1
        ready.set()
        for index, (label, _) in enumerate(FRAME_SHAPES.items()):
            interval_ns = FRAME_INTERVALS_US[label] * 1000
            next_ns = clock.now_ns() + interval_ns
            for i in range(len(FRAME_PATHS) * (warmup + count)):
                clock.sleep_until(next_ns)
                next_ns = max(next_ns + interval_ns, clock.now_ns())
                send(FRAME_PATHS[i % len(FRAME_PATHS)], index, i // len(FRAME_PATHS))
            # Throughput: each burst ends when every receiver has acknowledged its last frame.
            durations = bursts.setdefault(label, {path: [] for path in FRAME_PATHS})
            for round_index in range(BURST_WARMUP_ROUNDS + BURST_ROUNDS):
                time.sleep(BENCH_SHM.lease_ms / 1000)
                for path in FRAME_PATHS:
                    start_ns = clock.now_ns()
                    for seq in range(BURST_FRAMES):
                        send(path, index, _BURST_SEQ + seq)
                    socket.send(_BURST_END)
                    for _ in range(subscribers):
                        if not acks.poll(_RECV_TIMEOUT_MS):
                            raise FusionError("a bench receiver did not finish a burst")
                        acks.recv()
                    if round_index >= BURST_WARMUP_ROUNDS:
                        durations[path].append(clock.now_ns() - start_ns)
        socket.send(_END)
        result.put({"bursts": bursts, "fallbacks": writer.fallbacks})
    finally:
        writer.close()
        acks.close()
        socket.close()
        context.term()


def _frame_receiver_blocking(endpoint: str, ack_endpoint: str, warmup: int,
                             result: Any) -> None:
    """Receiver process: one blocking loop, as a camera consumer would run."""
    context = zmq.Context()
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.RCVHWM, 0)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    socket.setsockopt(zmq.RCVTIMEO, _RECV_TIMEOUT_MS)
    socket.connect(endpoint)
    acks = context.socket(zmq.PUSH)
    acks.setsockopt(zmq.LINGER, 1000)
    acks.connect(ack_endpoint)
    reader = ShmReader()
    shapes = list(FRAME_SHAPES.values())
    latencies: dict[str, dict[str, list[int]]] = {
        label: {path: [] for path in FRAME_PATHS} for label in FRAME_SHAPES}
    labels = list(FRAME_SHAPES)
    rejected: dict[str, int] = {}
    try:
        while socket.recv() != _PROBE:
            pass
        acks.send(b"ready")
        while True:
            parts = socket.recv_multipart(copy=False)
            topic = parts[0].bytes
            path = _PATH_OF_TOPIC.get(topic)
            if path in ("raw", "floor"):
                seq, t_send_ns, index = _FRAME_HEADER.unpack_from(parts[1].buffer)
                if path == "raw":
                    np.frombuffer(parts[2], np.uint8).reshape(shapes[index])
                t_recv_ns = time.monotonic_ns()
                label = labels[index]
            elif path is not None:
                try:
                    msg = decode(parts, 0, reader)
                except FusionError as exc:
                    rejected[str(exc).split(":")[0]] = rejected.get(str(exc).split(":")[0], 0) + 1
                    continue
                t_recv_ns = time.monotonic_ns()
                seq, t_send_ns = msg.seq, msg.t_capture_ns
                label = labels[shapes.index(msg.image.shape)]  # type: ignore[union-attr]
            elif topic == _BURST_END:
                acks.send(b"done")
                continue
            elif topic == _END:
                break
            else:
                continue
            if warmup <= seq < _BURST_SEQ:
                latencies[label][path].append(t_recv_ns - t_send_ns)
        result.put({"latencies": latencies, "rejected": rejected})
    finally:
        acks.close()
        socket.close()
        context.term()


def _result_of(process: Any, queue: Any, timeout_s: float) -> Any:
    """What `process` puts on `queue`; raise if it exits first or takes too long."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return queue.get(timeout=0.5)
        except Empty:
            if not process.is_alive():
                raise FusionError(f"{process.name} exited with code {process.exitcode} "
                                  "before reporting") from None
    raise FusionError(f"{process.name} did not report within {timeout_s} s")


def run_frame_bench(count: int = 500, warmup: int = 50,
                    subscribers: tuple[int, ...] = FRAME_SUBSCRIBERS,
                    samples: dict[str, Any] | None = None) -> dict[str, Any]:
    """Frames through raw pyzmq, ours and shared memory, to 1 and 3 subscriber processes.

    `samples`, if given, receives every one-way latency in ns, for plots:
    `samples[subscribers key][size label][path]`.

    Latency: paced frames, the three paths interleaved message by message. Throughput:
    bursts of `BURST_FRAMES` back-to-back frames per path, in rounds (the first
    `BURST_WARMUP_ROUNDS` discarded, each after the last one's leases expired), until every
    subscriber has received the last one; the median burst is reported as frames/s."""
    spawn = mp.get_context("spawn")
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fusion-bench-") as tmp:
        for n in progress(subscribers, desc="bench transport: frames, subscriber counts",
                          unit="run"):
            endpoint, ack_endpoint = f"ipc://{tmp}/frames{n}.sock", f"ipc://{tmp}/acks{n}.sock"
            ready, results, sender_result = spawn.Event(), spawn.Queue(), spawn.Queue()
            receivers = [spawn.Process(target=_frame_receiver_blocking, name=f"bench-rx{i}",
                                       args=(endpoint, ack_endpoint, warmup, results))
                         for i in range(n)]
            sender = spawn.Process(target=_frame_sender_blocking, name="bench-frame-sender",
                                   args=(endpoint, ack_endpoint, n, count, warmup, ready,
                                         sender_result))
            try:
                sender.start()
                for receiver in receivers:
                    receiver.start()
                sent = _result_of(sender, sender_result, _START_TIMEOUT_S + 300)
                received = [results.get(timeout=_RECV_TIMEOUT_MS / 1000) for _ in receivers]
            finally:
                for process in (sender, *receivers):
                    if process.pid is None:
                        continue
                    process.join(5)
                    if process.is_alive():
                        process.terminate()
                        process.join(5)
            by_size: dict[str, Any] = {}
            for label, shape in FRAME_SHAPES.items():
                entry: dict[str, Any] = {"payload_bytes": int(np.prod(shape)),
                                         "interval_us": FRAME_INTERVALS_US[label]}
                for path in FRAME_PATHS:
                    merged = [x for r in received for x in r["latencies"][label][path]]
                    if samples is not None:
                        samples.setdefault(f"{n}_subscriber{'s' if n > 1 else ''}", {}
                                           ).setdefault(label, {})[path] = merged
                    burst_ns = float(np.median(sent["bursts"][label][path]))
                    entry[path] = {**_percentiles_us(merged),
                                   "throughput_fps": round(BURST_FRAMES / (burst_ns / 1e9), 1)}
                raw = entry["raw"]
                for path in FRAME_PATHS[1:]:
                    entry[f"{path}_vs_raw"] = {
                        "latency_ratio_p50": round(entry[path]["p50_us"] / raw["p50_us"], 3),
                        "latency_ratio_p99": round(entry[path]["p99_us"] / raw["p99_us"], 3),
                        "throughput_ratio": round(entry[path]["throughput_fps"]
                                                  / raw["throughput_fps"], 3)}
                by_size[label] = entry
            rejected: dict[str, int] = {}
            for r in received:
                for reason, k in r["rejected"].items():
                    rejected[reason] = rejected.get(reason, 0) + k
            report[f"{n}_subscriber{'s' if n > 1 else ''}"] = {
                "sizes": by_size, "shm_fallbacks": sent["fallbacks"], "rejected": rejected}
    return {"count": count, "warmup": warmup, "burst_frames": BURST_FRAMES,
            "burst_rounds": BURST_ROUNDS, "burst_warmup_rounds": BURST_WARMUP_ROUNDS,
            "shm": {"slots": BENCH_SHM.slots, "lease_ms": BENCH_SHM.lease_ms,
                    "threshold_bytes": BENCH_SHM.threshold_bytes},
            "targets": SHM_TARGETS, **report}


def _percentiles_us(latencies_ns: list[int]) -> dict[str, Any]:
    values = np.asarray(latencies_ns, dtype=np.float64) / 1000.0
    p50, p99 = np.percentile(values, [50, 99]) if len(values) else (math.nan, math.nan)
    return {"count": len(values), "p50_us": round(float(p50), 1), "p99_us": round(float(p99), 1)}


def run_transport_bench(count: int = 2000, warmup: int = 100, endpoint: str | None = None,
                        intervals_us: dict[str, int] | None = None,
                        frames: bool = True,
                        samples: dict[str, Any] | None = None) -> dict[str, Any]:
    """Measure one-way latency of ours vs raw pyzmq per message kind; return a JSON-able dict.

    With `frames`, the result also holds `frames`: `run_frame_bench` (raw, ours and shared
    memory, 640x480 and 1280x720, one and three subscribers) with min(count, 500) frames.

    `samples`, if given, receives every one-way latency in ns, for plots: `samples["kinds"]
    [kind]["ours" | "raw"]`, and `samples["frames"]` as `run_frame_bench` fills it.

    `count` and `warmup` are per kind and per path. `endpoint` defaults to an ipc:// socket in
    a temporary directory. Takes about 2 × (count + warmup) × (2 + 1 + 1) ms plus process
    start-up (about 18 s at the defaults).
    """
    if count < 1 or warmup < 0:
        raise ValueError(f"count must be >= 1 and warmup >= 0, got {count} and {warmup}")
    intervals = {**DEFAULT_INTERVALS_US, **(intervals_us or {})}
    expected_s = 2 * (count + warmup) * sum(intervals.values()) / 1e6
    started = time.monotonic()
    # A bar of one step, not a live one: a redraw while the receiver thread measures (in this
    # process) would be part of the latencies it measures.
    with (progress(desc=f"bench transport: messages, about {expected_s:.0f} s", total=1,
                   unit="run") as bar,
          tempfile.TemporaryDirectory(prefix="fusion-bench-") as tmp):
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
            sender.join(_START_TIMEOUT_S + 2 * expected_s)
            receiver.join(_RECV_TIMEOUT_MS / 1000 + 1)
        finally:
            if sender.is_alive():
                sender.terminate()
                sender.join(5)
            context.term()
        bar.update()
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
    result: dict[str, Any] = {
        "bench": "transport",
        "endpoint": endpoint.split("://", 1)[0],
        "count": count,
        "warmup": warmup,
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "elapsed_s": round(time.monotonic() - started, 2),
        "kinds": kinds,
    }
    if samples is not None:
        samples["kinds"] = receiver.latencies_ns
    if frames:
        result["frames"] = run_frame_bench(
            min(count, 500), min(warmup, 50),
            samples=None if samples is None else samples.setdefault("frames", {}))
        result["elapsed_s"] = round(time.monotonic() - started, 2)
    return result


def main(argv: list[str] | None = None) -> None:
    """Print the bench result as one JSON object."""
    parser = argparse.ArgumentParser(prog="python -m fusion_node.bench.transport",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="messages per kind and path")
    parser.add_argument("--warmup", type=int, default=100, help="discarded, per kind and path")
    parser.add_argument("--endpoint", help="default: ipc:// in a temporary directory")
    args = parser.parse_args(argv)
    print(json.dumps(run_transport_bench(args.count, args.warmup, args.endpoint), indent=2))


if __name__ == "__main__":
    main()
