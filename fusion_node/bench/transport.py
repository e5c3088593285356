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

A third part (`run_dds_bench`, the result's `dds`) prices publishing as ROS 2 topics over DDS
(fusion_node.ros2.dds) next to the ZeroMQ path: for a joint state and the two predictions,
interleaved, one-way latency on each and the sender's CPU time per message.

A second part (`run_frame_bench`, the result's `frames`) compares 640x480x3 frames through
each contender's public API, to one and to three subscriber processes, in one run: raw pyzmq
zero-copy, ours inline (`Publisher(shm=None)`), ours through shared memory by copy
(`Publisher.send`) and by loan (`Publisher.loan`), and Zenoh with its explicit
shared-memory buffers (eclipse-zenoh, the `[zenoh]` extra: scouting off, explicit loopback
endpoints). Every path stamps before the producer writes the frame into the buffer it sends.
Latency: paced frames, the paths in a fresh random order for each frame, over 5 rounds,
warm-up discarded. Throughput: per round, each path flat out: intact frames received per
second per subscriber, and the share of the sent frames delivered intact. The result's
`acceptance` holds issue 23's targets against the run's medians.

Run `python -m fusion_node.bench.transport` (or `fusion-node bench transport --json`); it
prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import socket as socket_module
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
from fusion_node.protocol import (
    AudioChunk,
    Frame,
    JointState,
    Message,
    Prediction,
    decode,
    encode,
)
from fusion_node.shm import ShmConfig
from fusion_node.transport import DEFAULT_HWM, Publisher, Subscriber

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


# -- frames: every contender through its public API, interleaved and shuffled ----------------

FRAME_SHAPES = {"640x480x3": (480, 640, 3)}
# raw: pyzmq's own idiom, `[topic, 24-byte struct header, array]` with copy=False.
# ours: `Publisher(shm=None)`, the protocol inline (zero-copy send, a view on receipt).
# shm: `Publisher.send` of an array the producer already wrote: one copy into the ring.
# shm_loan: `Publisher.loan`, then the producer writes the frame into the slot, then `send`.
# zenoh_shm: eclipse-zenoh with its explicit shared-memory buffers (`ShmProvider.alloc`,
#   write, `put`), scouting off, explicit loopback endpoints.
# Every path stamps before the producer writes the frame into the buffer it sends (a fresh
# array for raw and ours, the ring slot for shm and shm_loan, the zenoh buffer), so each
# measures one write of the frame plus its transport. Allocation comes before the stamp.
FRAME_PATHS = ("raw", "ours", "shm", "shm_loan", "zenoh_shm")
FRAME_SUBSCRIBERS = (1, 3)
FRAME_INTERVAL_US = 3000  # paced: three receivers on two cores keep up (latency, not queueing)
FRAME_ROUNDS = 5
THROUGHPUT_S = 0.4  # per path and round, the publisher flat out
_DRAIN_S = 0.3  # after a burst, before the next path's: the receivers empty their queues
# The acceptance targets (issue 23), reported, never enforced here.
SHM_TARGETS = {"loan_vs_zenoh_p50_1_subscriber_max": 0.8,
               "loan_vs_raw_p50_1_subscriber_max": 0.6,
               "loan_vs_zenoh_p50_3_subscribers_max": 0.6,
               "loan_vs_zenoh_throughput_3_subscribers_min": 1.0,
               "overwritten_max": 0, "fallbacks_max": 0}
# Default settings: the ring the node's drivers get (fusion_node.transport.DEFAULT_SHM).
BENCH_SHM = ShmConfig()
_STREAM_OF = {"ours": "camera.ours", "shm": "camera.shm", "shm_loan": "camera.loan"}
_PATH_OF_STREAM = {stream: path for path, stream in _STREAM_OF.items()}
_FRAME_HEADER = struct.Struct("<qqq")  # raw: seq, t_send_ns, round
_ZENOH_ATTACHMENT = struct.Struct("<qqq")  # zenoh: seq, t_send_ns, round
_ZENOH_KEY = "bench/frames"
_PROBE_SEQ = -1
_BURST_SEQ = 1 << 40  # burst frames count from here: throughput only, no latency


def zenoh_available() -> bool:
    """Whether eclipse-zenoh (the `[zenoh]` extra, bench only) can be imported."""
    try:
        import zenoh  # noqa: F401
    except ImportError:
        return False
    return True


def _zenoh_session(listen: str | None = None, connect: str | None = None) -> Any:
    """A zenoh peer on loopback only: no scouting, one explicit endpoint, shared memory on."""
    import zenoh

    config = zenoh.Config()
    config.insert_json5("mode", json.dumps("peer"))
    config.insert_json5("scouting/multicast/enabled", "false")
    config.insert_json5("scouting/gossip/enabled", "false")
    config.insert_json5("listen/endpoints", json.dumps([listen] if listen else []))
    config.insert_json5("connect/endpoints", json.dumps([connect] if connect else []))
    config.insert_json5("transport/shared_memory/enabled", "true")
    return zenoh.open(config)


def _stamp_seq(image: np.ndarray, seq: int) -> None:
    """Write `seq` into the first and last 8 bytes: a receiver proves a frame intact (not
    overwritten, not torn) by reading both back."""
    flat = image.reshape(-1)
    flat[:8] = np.frombuffer(struct.pack("<q", seq), np.uint8)
    flat[-8:] = flat[:8]


def _intact(flat: Any, seq: int) -> bool:
    return bool(struct.unpack_from("<q", flat, 0)[0] == seq
                and struct.unpack_from("<q", flat, len(flat) - 8)[0] == seq)


class _FrameSender:
    """The sender's side of every contender, one call per frame."""

    def __init__(self, context: zmq.Context, endpoints: dict[str, str], paths: tuple[str, ...],
                 shape: tuple[int, ...]) -> None:
        self.paths = paths
        self.shape = shape
        self.clock = MonotonicClock(spin_ns=0)
        rng = np.random.default_rng(0)
        self.source = rng.integers(0, 256, size=shape, dtype=np.uint8)
        self.raw = context.socket(zmq.PUB)
        self.raw.setsockopt(zmq.SNDHWM, DEFAULT_HWM)  # as the Publisher's
        self.raw.setsockopt(zmq.LINGER, 0)
        self.raw.bind(endpoints["raw"])
        self.inline = Publisher(context, endpoints["ours"], shm=None)
        self.shm = Publisher(context, endpoints["shm"], shm=BENCH_SHM)
        self.zenoh: Any = None
        if "zenoh_shm" in paths:
            from zenoh import CongestionControl
            from zenoh.shm import BlockOn, GarbageCollect, ShmProvider

            self.zenoh = _zenoh_session(listen=endpoints["zenoh_shm"])
            # The same memory as our ring: as many frames as it has slots.
            slot = -(-int(np.prod(shape)) // 4096) * 4096
            self.provider = ShmProvider.default_backend(BENCH_SHM.slots * slot)
            self.policy = BlockOn(GarbageCollect())  # wait for a buffer, as a loan can
            # Express (no batching) for latency; batching, zenoh's default, for throughput.
            self.zenoh_express = self.zenoh.declare_publisher(
                _ZENOH_KEY, express=True, congestion_control=CongestionControl.BLOCK)
            self.zenoh_batched = self.zenoh.declare_publisher(_ZENOH_KEY)
            self.source_bytes = bytearray(self.source.tobytes())
        self.sent = dict.fromkeys(paths, 0)

    def probe(self) -> None:
        """One small message per transport, until every receiver has heard each."""
        self.raw.send_multipart([b"raw.frame", _FRAME_HEADER.pack(_PROBE_SEQ, 0, 0)])
        probe = np.zeros((1, 1, 3), np.uint8)
        self.inline.send(Frame("camera.probe.inline", 0, 0, probe))
        self.shm.send(Frame("camera.probe.shm", 0, 0, probe))
        if self.zenoh is not None:
            self.zenoh_express.put(b"", attachment=_ZENOH_ATTACHMENT.pack(_PROBE_SEQ, 0, 0))

    def send(self, path: str, seq: int, round_index: int, flat_out: bool = False) -> None:
        clock, source = self.clock, self.source
        if path == "raw":
            image = np.empty_like(source)
            t_ns = clock.now_ns()
            np.copyto(image, source)
            _stamp_seq(image, seq)
            self.raw.send_multipart([b"raw.frame", _FRAME_HEADER.pack(seq, t_ns, round_index),
                                     image], copy=False)
        elif path == "ours":
            image = np.empty_like(source)
            t_ns = clock.now_ns()
            np.copyto(image, source)
            _stamp_seq(image, seq)
            self.inline.send(Frame(_STREAM_OF[path], seq, t_ns, image))
        elif path == "shm":
            _stamp_seq(source, seq)  # the producer's frame, already written
            t_ns = clock.now_ns()
            self.shm.send(Frame(_STREAM_OF[path], seq, t_ns, source))  # copied into a slot
        elif path == "shm_loan":
            # Flat out, wait for a release as zenoh's BlockOn does; paced, never wait.
            image = self.shm.loan(_STREAM_OF[path], source.shape, source.dtype,
                                  wait_ms=1000 if flat_out else 0)
            t_ns = clock.now_ns()
            np.copyto(image, source)
            _stamp_seq(image, seq)
            self.shm.send(Frame(_STREAM_OF[path], seq, t_ns, image))
        else:
            buffer = self.provider.alloc(len(self.source_bytes), self.policy)
            t_ns = clock.now_ns()
            data = self.source_bytes
            data[:8] = data[-8:] = struct.pack("<q", seq)
            buffer[0:len(data)] = data
            publisher = self.zenoh_batched if flat_out else self.zenoh_express
            publisher.put(buffer, attachment=_ZENOH_ATTACHMENT.pack(seq, t_ns, round_index))
        self.sent[path] += 1

    def close(self) -> None:
        self.raw.close(linger=0)
        self.inline.close()
        self.shm.close()
        if self.zenoh is not None:
            self.zenoh_express.undeclare()
            self.zenoh_batched.undeclare()
            self.zenoh.close()


def _frame_sender_blocking(endpoints: dict[str, str], paths: tuple[str, ...], subscribers: int,
                           count: int, warmup: int, rounds: int, seed: int,
                           result: Any) -> None:
    """Sender process: paced frames, every path interleaved in a shuffled order per message
    over `rounds` rounds; then, per round and in a shuffled path order, each path flat out
    for `THROUGHPUT_S`."""
    context = zmq.Context()
    control = context.socket(zmq.PUB)
    control.setsockopt(zmq.LINGER, 1000)
    control.bind(endpoints["control"])
    acks = context.socket(zmq.PULL)
    acks.setsockopt(zmq.LINGER, 0)
    acks.bind(endpoints["acks"])
    shape = FRAME_SHAPES["640x480x3"]
    sender = _FrameSender(context, endpoints, paths, shape)
    clock = sender.clock
    rng = np.random.default_rng(seed)
    bursts: dict[str, list[dict[str, int]]] = {path: [] for path in paths}
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        ready = 0
        while ready < subscribers:  # PUB/SUB slow joiners, on every transport
            if time.monotonic() > deadline:
                raise FusionError("bench receivers never heard every transport")
            sender.probe()
            control.send(b"probe")
            if acks.poll(10):
                acks.recv()
                ready += 1
        per_round = -(-(warmup + count) // rounds)
        interval_ns = FRAME_INTERVAL_US * 1000
        next_ns = clock.now_ns() + interval_ns
        for seq in range(rounds * per_round):
            for path in rng.permutation(paths):
                clock.sleep_until(next_ns)
                next_ns = max(next_ns + interval_ns, clock.now_ns())
                sender.send(str(path), seq, seq // per_round)
        for round_index in range(rounds):
            for path in rng.permutation(paths):
                path = str(path)
                time.sleep(_DRAIN_S)
                seq = _BURST_SEQ + round_index * (1 << 30)
                start_ns = clock.now_ns()
                sent = 0
                while clock.now_ns() - start_ns < THROUGHPUT_S * 1e9:
                    sender.send(path, seq + sent, round_index, flat_out=True)
                    sent += 1
                bursts[path].append({"start_ns": start_ns, "end_ns": clock.now_ns(),
                                     "sent": sent})
        time.sleep(_DRAIN_S)
        control.send(b"end")
        shm = sender.shm.shm
        result.put({"bursts": bursts, "per_round": per_round,
                    "fallbacks": dict(shm.fallbacks_by_stream) if shm is not None else {},
                    "ring_full": shm.ring_full if shm is not None else 0})
    finally:
        sender.close()
        acks.close()
        control.close()
        context.term()


class _FrameStats:
    """What one receiver saw of one path: latencies of paced frames (after the warm-up) and,
    per burst round, intact and damaged frames and the last arrival."""

    def __init__(self, rounds: int) -> None:
        self.latencies_ns: list[int] = []
        self.round_of: list[int] = []
        self.intact = [0] * rounds
        self.damaged = [0] * rounds
        self.last_ns = [0] * rounds
        self.paced_damaged = 0

    def record(self, seq: int, t_send_ns: int, t_recv_ns: int, round_index: int, intact: bool,
               warmup: int) -> None:
        if seq >= _BURST_SEQ:
            if intact:
                self.intact[round_index] += 1
                self.last_ns[round_index] = t_recv_ns
            else:
                self.damaged[round_index] += 1
        elif not intact:
            self.paced_damaged += 1
        elif seq >= warmup:
            self.latencies_ns.append(t_recv_ns - t_send_ns)
            self.round_of.append(round_index)


def _frame_receiver_blocking(endpoints: dict[str, str], paths: tuple[str, ...], warmup: int,
                             rounds: int, per_round: int, result: Any) -> None:
    """Receiver process: one blocking thread per transport, as a camera consumer would run
    each; every frame is checked intact before it is dropped (which releases its slot)."""
    context = zmq.Context()
    stats = {path: _FrameStats(rounds) for path in paths}
    heard: set[str] = set()
    stop = threading.Event()
    errors: list[str] = []

    def round_of(seq: int) -> int:
        return min(seq // per_round, rounds - 1)

    def raw_blocking() -> None:
        socket = context.socket(zmq.SUB)
        socket.setsockopt(zmq.RCVHWM, DEFAULT_HWM)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SUBSCRIBE, b"raw.frame")
        socket.connect(endpoints["raw"])
        record = stats["raw"].record
        try:
            while not stop.is_set():
                if not socket.poll(100):
                    continue
                parts = socket.recv_multipart(copy=False)
                seq, t_send_ns, round_index = _FRAME_HEADER.unpack_from(parts[1].buffer)
                if seq == _PROBE_SEQ:
                    heard.add("raw")
                    continue
                # What a hand-written subscriber does: view the payload, trust the sender.
                image = np.frombuffer(parts[2].buffer, np.uint8)
                t_recv_ns = time.monotonic_ns()
                record(seq, t_send_ns, t_recv_ns, round_index, _intact(image, seq), warmup)
        finally:
            socket.close()

    def ours_blocking() -> None:
        subscriber = Subscriber(context, [endpoints["ours"], endpoints["shm"]],
                                MonotonicClock())
        try:
            while not stop.is_set():
                msg = subscriber.recv(100)
                if msg is None:
                    continue
                t_recv_ns = time.monotonic_ns()
                if not isinstance(msg, Frame):
                    continue
                path = _PATH_OF_STREAM.get(msg.stream)
                if path is None:
                    heard.update(("ours",) if msg.stream.endswith("inline")
                                 else ("shm", "shm_loan"))
                    continue
                lease = subscriber.last_lease
                flat = msg.image.reshape(-1)
                intact = _intact(flat, msg.seq) and (lease is None or lease.valid())
                round_index = (msg.seq - _BURST_SEQ) >> 30 if msg.seq >= _BURST_SEQ \
                    else round_of(msg.seq)
                stats[path].record(msg.seq, msg.t_capture_ns, t_recv_ns, round_index, intact,
                                   warmup)
                del msg, flat  # releases the slot
            summary["shm"] = subscriber.shm_stats()
            summary["rejected"] = dict(subscriber.rejected)
        finally:
            subscriber.close()

    def on_zenoh(sample: Any) -> None:
        shm = sample.payload.as_shm()
        t_recv_ns = time.monotonic_ns()
        seq, t_send_ns, round_index = _ZENOH_ATTACHMENT.unpack(sample.attachment.to_bytes())
        if seq == _PROBE_SEQ:
            heard.add("zenoh_shm")
            return
        # zenoh-python's buffers export no buffer protocol: reading a byte means a copy.
        intact = shm is not None and shm.is_valid() and _intact(bytes(shm), seq)
        summary["zenoh_not_shm"] += shm is None
        stats["zenoh_shm"].record(seq, t_send_ns, t_recv_ns, round_index, intact, warmup)

    summary: dict[str, Any] = {"zenoh_not_shm": 0}
    threads = [threading.Thread(target=_guarded(raw_blocking, errors), daemon=True),
               threading.Thread(target=_guarded(ours_blocking, errors), daemon=True)]
    for thread in threads:
        thread.start()
    session = subscriber_z = None
    control = context.socket(zmq.SUB)
    control.setsockopt(zmq.SUBSCRIBE, b"")
    control.setsockopt(zmq.LINGER, 0)
    control.connect(endpoints["control"])
    acks = context.socket(zmq.PUSH)
    acks.setsockopt(zmq.LINGER, 2000)
    acks.connect(endpoints["acks"])
    try:
        if "zenoh_shm" in paths:
            session = _zenoh_session(connect=endpoints["zenoh_shm"])
            subscriber_z = session.declare_subscriber(_ZENOH_KEY, on_zenoh)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while set(paths) - heard:
            if time.monotonic() > deadline or errors:
                raise FusionError(f"bench receiver heard only {sorted(heard)}: {errors}")
            time.sleep(0.01)
        acks.send(b"ready")
        while control.recv() != b"end":
            pass
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)
        if subscriber_z is not None:
            subscriber_z.undeclare()
        if session is not None:
            session.close()
    result.put({"stats": {path: vars(s) for path, s in stats.items()}, "errors": errors,
                **summary})
    acks.close()
    control.close()
    context.term()


def _guarded(function: Any, errors: list[str]) -> Any:
    def run() -> None:
        try:
            function()
        except Exception as exc:  # noqa: BLE001 - reported by run_frame_bench, not lost
            errors.append(f"{function.__name__}: {type(exc).__name__}: {exc}")
    return run


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


def _free_tcp_port() -> int:
    with socket_module.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_frame_bench(count: int = 500, warmup: int = 50,
                    subscribers: tuple[int, ...] = FRAME_SUBSCRIBERS,
                    samples: dict[str, Any] | None = None, rounds: int = FRAME_ROUNDS,
                    zenoh: bool | None = None, seed: int = 0) -> dict[str, Any]:
    """640x480x3 frames through raw pyzmq, ours inline, shared memory (copy and loan) and
    Zenoh SHM, to 1 and 3 subscriber processes, in one interleaved, shuffled run.

    Latency: `count` paced frames per path after `warmup` discarded ones, the paths in a
    new random order for every frame, over `rounds` rounds; medians over all, and per round.
    Throughput: per round, each path in a random order flat out for `THROUGHPUT_S`: received
    intact frames per second per subscriber, and the share of the sent frames that arrived
    intact. Zenoh runs when eclipse-zenoh is installed (`zenoh=None`) or when asked.

    `samples`, if given, receives every one-way latency in ns, for plots:
    `samples[subscribers key][size label][path]`."""
    if count < 1 or warmup < 0 or rounds < 1:
        raise ValueError(f"count {count} and rounds {rounds} must be >= 1, warmup {warmup} "
                         ">= 0")
    use_zenoh = zenoh_available() if zenoh is None else zenoh
    paths = FRAME_PATHS if use_zenoh else tuple(p for p in FRAME_PATHS if p != "zenoh_shm")
    spawn = mp.get_context("spawn")
    report: dict[str, Any] = {}
    label = "640x480x3"
    per_round = -(-(warmup + count) // rounds)
    with tempfile.TemporaryDirectory(prefix="fusion-bench-") as tmp:
        for n in progress(subscribers, desc="bench transport: frames, subscriber counts",
                          unit="run"):
            endpoints = {name: f"ipc://{tmp}/{name}{n}.sock"
                         for name in ("raw", "ours", "shm", "control", "acks")}
            endpoints["zenoh_shm"] = f"tcp/127.0.0.1:{_free_tcp_port()}"
            results, sender_result = spawn.Queue(), spawn.Queue()
            sender = spawn.Process(target=_frame_sender_blocking, name="bench-frame-sender",
                                   args=(endpoints, paths, n, count, warmup, rounds,
                                         seed + n, sender_result))
            receivers = [spawn.Process(target=_frame_receiver_blocking, name=f"bench-rx{i}",
                                       args=(endpoints, paths, warmup, rounds, per_round,
                                             results))
                         for i in range(n)]
            try:
                sender.start()
                for receiver in receivers:
                    receiver.start()
                expected_s = (rounds * per_round * len(paths) * FRAME_INTERVAL_US / 1e6
                              + rounds * len(paths) * (THROUGHPUT_S + _DRAIN_S))
                sent = _result_of(sender, sender_result, _START_TIMEOUT_S + 3 * expected_s)
                received = [_result_of(r, results, 30) for r in receivers]
            finally:
                for process in (sender, *receivers):
                    if process.pid is None:
                        continue
                    process.join(5)
                    if process.is_alive():
                        process.terminate()
                        process.join(5)
            errors = [e for r in received for e in r["errors"]]
            if errors:
                raise FusionError(f"frame bench receivers failed: {errors}")
            report[f"{n}_subscriber{'s' if n > 1 else ''}"] = _frame_report(
                paths, label, n, sent, received, rounds, samples)
    groups = list(report.values())
    return {"count": count, "warmup": warmup, "rounds": rounds, "per_round": per_round,
            "interval_us": FRAME_INTERVAL_US, "throughput_s": THROUGHPUT_S,
            "paths": list(paths), "zenoh": _zenoh_version() if use_zenoh else None,
            "shm": {"slots": BENCH_SHM.slots, "lease_ms": BENCH_SHM.lease_ms,
                    "threshold_bytes": BENCH_SHM.threshold_bytes,
                    "subscribers": BENCH_SHM.subscribers},
            "targets": SHM_TARGETS,
            "acceptance": _acceptance(report) if use_zenoh and len(groups) else {},
            **report}


def _zenoh_version() -> str:
    from importlib.metadata import version

    return version("eclipse-zenoh")


def _frame_report(paths: tuple[str, ...], label: str, n: int, sent: dict[str, Any],
                  received: list[dict[str, Any]], rounds: int,
                  samples: dict[str, Any] | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"payload_bytes": int(np.prod(FRAME_SHAPES[label])),
                             "interval_us": FRAME_INTERVAL_US}
    for path in paths:
        per_rx = [r["stats"][path] for r in received]
        merged = [x for s in per_rx for x in s["latencies_ns"]]
        if samples is not None:
            samples.setdefault(f"{n}_subscriber{'s' if n > 1 else ''}", {}
                               ).setdefault(label, {})[path] = merged
        by_round = []
        for k in range(rounds):
            values = [x for s in per_rx for x, r in zip(s["latencies_ns"], s["round_of"])
                      if r == k]
            by_round.append(round(float(np.median(values)) / 1000, 1) if values else None)
        fps, shares = [], []
        damaged = sum(sum(s["damaged"]) + s["paced_damaged"] for s in per_rx)
        for k, burst in enumerate(sent["bursts"][path]):
            for s in per_rx:
                intact = s["intact"][k]
                span_ns = (s["last_ns"][k] - burst["start_ns"]) if intact else 0
                fps.append(intact / (span_ns / 1e9) if span_ns > 0 else 0.0)
                shares.append(intact / burst["sent"] if burst["sent"] else 0.0)
        sent_fps = [b["sent"] / ((b["end_ns"] - b["start_ns"]) / 1e9)
                    for b in sent["bursts"][path]]
        entry[path] = {**_percentiles_us(merged), "p50_us_by_round": by_round,
                       "throughput_fps": round(float(np.median(fps)), 1),
                       "throughput_fps_min": round(float(np.min(fps)), 1),
                       "sent_fps": round(float(np.median(sent_fps)), 1),
                       "delivered_intact": round(float(np.median(shares)), 4),
                       "overwritten": damaged}
    raw = entry["raw"]
    for path in paths[1:]:
        entry[f"{path}_vs_raw"] = {
            "latency_ratio_p50": round(entry[path]["p50_us"] / raw["p50_us"], 3),
            "latency_ratio_p99": round(entry[path]["p99_us"] / raw["p99_us"], 3),
            "throughput_ratio": round(entry[path]["throughput_fps"]
                                      / max(raw["throughput_fps"], 1e-9), 3)}
    if "zenoh_shm" in paths:
        zenoh = entry["zenoh_shm"]
        for path in ("shm", "shm_loan"):
            entry[f"{path}_vs_zenoh_shm"] = {
                "latency_ratio_p50": round(entry[path]["p50_us"] / zenoh["p50_us"], 3),
                "throughput_ratio": round(entry[path]["throughput_fps"]
                                          / max(zenoh["throughput_fps"], 1e-9), 3)}
    rejected: dict[str, int] = {}
    shm: dict[str, Any] = {"dropped": 0, "fallbacks_seen": 0, "copied": 0}
    for r in received:
        for reason, k in r.get("rejected", {}).items():
            rejected[reason] = rejected.get(reason, 0) + k
        stats = r.get("shm", {})
        shm["dropped"] += sum(stats.get("dropped", {}).values())
        shm["fallbacks_seen"] += sum(stats.get("fallbacks", {}).values())
        shm["copied"] += stats.get("copied", 0)
    return {"sizes": {label: entry}, "shm_fallbacks": sum(sent["fallbacks"].values()),
            "shm_ring_full": sent["ring_full"], "shm_receivers": shm, "rejected": rejected,
            "zenoh_not_shm": sum(r.get("zenoh_not_shm", 0) for r in received)}


def _acceptance(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets against this run's medians (met or not, with the figures)."""
    out: dict[str, Any] = {}
    one = report.get("1_subscriber", {}).get("sizes", {}).get("640x480x3")
    three = report.get("3_subscribers", {}).get("sizes", {}).get("640x480x3")
    if one:
        ratio = one["shm_loan_vs_zenoh_shm"]["latency_ratio_p50"]
        out["loan_vs_zenoh_p50_1_subscriber"] = {"value": ratio, "met": ratio <= 0.8}
        ratio = one["shm_loan_vs_raw"]["latency_ratio_p50"]
        out["loan_vs_raw_p50_1_subscriber"] = {"value": ratio, "met": ratio <= 0.6}
    if three:
        ratio = three["shm_loan_vs_zenoh_shm"]["latency_ratio_p50"]
        out["loan_vs_zenoh_p50_3_subscribers"] = {"value": ratio, "met": ratio <= 0.6}
        ratio = three["shm_loan_vs_zenoh_shm"]["throughput_ratio"]
        out["loan_vs_zenoh_throughput_3_subscribers"] = {"value": ratio, "met": ratio >= 1.0}
    overwritten = sum(group["sizes"]["640x480x3"][path]["overwritten"]
                      for group in report.values() for path in ("shm", "shm_loan"))
    out["overwritten_delivered"] = {"value": overwritten, "met": overwritten == 0}
    # Default ring settings: the paced and the flat-out frames alike.
    fallbacks = sum(group["shm_fallbacks"] for group in report.values())
    out["fallbacks"] = {"value": fallbacks, "met": fallbacks == 0}
    return out


def _percentiles_us(latencies_ns: list[int]) -> dict[str, Any]:
    values = np.asarray(latencies_ns, dtype=np.float64) / 1000.0
    p50, p99 = np.percentile(values, [50, 99]) if len(values) else (math.nan, math.nan)
    return {"count": len(values), "p50_us": round(float(p50), 1), "p99_us": round(float(p99), 1)}


def run_transport_bench(count: int = 2000, warmup: int = 100, endpoint: str | None = None,
                        intervals_us: dict[str, int] | None = None,
                        frames: bool = True,
                        samples: dict[str, Any] | None = None,
                        dds: bool | None = None) -> dict[str, Any]:
    """Measure one-way latency of ours vs raw pyzmq per message kind; return a JSON-able dict.

    With `frames`, the result also holds `frames`: `run_frame_bench` (raw pyzmq, ours inline,
    shared memory by copy and by loan, Zenoh SHM; 640x480x3; one and three subscribers) with
    min(count, 500) frames per path (about a minute).
    With `dds` (default: as `frames`, the full bench), it also holds `dds`: `run_dds_bench`
    with min(count, 500) messages, or why it was skipped.

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
    if frames if dds is None else dds:
        try:
            import cyclonedds  # noqa: F401 - the [ros2] extra
        except ImportError:
            result["dds"] = {"skipped": "cyclonedds is not installed (the [ros2] extra)"}
        else:
            result["dds"] = run_dds_bench(min(count, 500), min(warmup, 50))
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


# -- DDS: what publishing as ROS 2 topics (fusion_node.ros2.dds) adds to the ZeroMQ path --------

DDS_KINDS = ("joints", "pred.speech", "pred.action")
DDS_PATHS = ("zmq", "dds")
DDS_INTERVAL_US = 2000
_DDS_END = "bench.dds.end"


def _dds_message(kind: str, seq: int, t_ns: int) -> Message:
    """A joint state or a prediction shaped as the node's, stamped `t_ns` (t_ref for a
    prediction: the time ROS 2 carries in the header)."""
    if kind == "joints":
        array = _payload("joints")
        return JointState(_STREAMS["joints"], seq, t_ns, JOINT_NAMES, array[0], array[1],
                          array[2])
    trace = {"t_capture_ns": t_ns, "t_ready_ns": t_ns}
    if kind == "pred.speech":
        return Prediction(
            kind, seq, t_ns, t_ns, "speech", "bench", {"audio.mic0": True, "camera.front": True},
            {"voice_activity": 0.5, "voice_active": True, "active_speaker": 0.5,
             "speaker_visible_talking": True, "command": "red", "command_index": 3,
             "command_confidence": 0.5, "frame_period_ns": 33_333_333},
            {"voice_activity": np.full(3, 0.5, np.float32),
             "active_speaker": np.full(3, 0.5, np.float32),
             "command_posterior": np.full(17, 1 / 17, np.float32)}, trace)
    return Prediction(
        kind, seq, t_ns, t_ns, "action", "bench", {"camera.front": True, "joints.arm": True},
        {"joint_names": list(JOINT_NAMES), "horizon": 20, "step_period_ns": 20_000_000},
        {"actions": np.zeros((20, len(JOINT_NAMES)), np.float32),
         "step_times_ns": t_ns + 20_000_000 * np.arange(1, 21, dtype=np.int64)}, trace)


def _dds_topics() -> dict[str, tuple[str, str, bool]]:
    """Per kind: ROS 2 topic, type, and whether ROS publishes it with sensor data QoS."""
    from fusion_node.ros2.messages import ros_topic

    joints = ros_topic(_STREAMS["joints"], "joints")
    speech = ros_topic("pred.speech", "prediction", "speech")
    action = ros_topic("pred.action", "prediction", "action")
    return {"joints": (joints.name, joints.type, True),
            "pred.speech": (speech.name, speech.type, False),
            "pred.action": (action.name, action.type, False)}


def _dds_entities(domain_id: int, writer: bool) -> tuple[Any, dict[str, Any], Any]:
    """A loopback-only domain, and a writer or reader per kind with the bridge's QoS."""
    from cyclonedds.domain import Domain, DomainParticipant
    from cyclonedds.pub import DataWriter
    from cyclonedds.sub import DataReader
    from cyclonedds.topic import Topic

    from fusion_node.ros2 import messages
    from fusion_node.ros2.dds import (
        LOOPBACK_ONLY,
        DdsTypes,
        dds_topic,
        default_qos,
        sensor_data_qos,
    )

    domain = Domain(domain_id, LOOPBACK_ONLY)  # this bench's own, kept on loopback
    participant = DomainParticipant(domain_id)
    types = DdsTypes(messages.typestore())
    entity = DataWriter if writer else DataReader
    endpoints = {
        kind: entity(participant, Topic(participant, dds_topic(name), types.idl(ros_type)),
                     qos=sensor_data_qos(100) if sensor else default_qos(100))
        for kind, (name, ros_type, sensor) in _dds_topics().items()}
    return (domain, participant), endpoints, types


def _dds_send_blocking(endpoint: str, domain_id: int, count: int, warmup: int,
                       ready: Any, costs: Any) -> None:
    """Sender process: each message of each kind alternately over ZeroMQ (protocol.encode,
    as the node's publisher sends) and over DDS (to_ros, to IDL, write, as the bridge
    does), paced; the CPU time each send took goes back on `costs`."""
    from fusion_node.clock import thread_cpu_ns
    from fusion_node.ros2 import messages

    clock = MonotonicClock(spin_ns=0)
    context = zmq.Context()
    socket = context.socket(zmq.PUB)
    socket.setsockopt(zmq.SNDHWM, 0)
    socket.setsockopt(zmq.LINGER, 5000)
    socket.bind(endpoint)
    keep, writers, types = _dds_entities(domain_id, writer=True)
    topics = _dds_topics()
    cpu_ns: dict[str, dict[str, list[int]]] = {k: {p: [] for p in DDS_PATHS} for k in DDS_KINDS}
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not ready.wait(0.01):  # the receiver has both paths matched
            if time.monotonic() > deadline:
                raise FusionError("bench receiver never subscribed (ZeroMQ and DDS)")
            socket.send(_PROBE)
        for kind in DDS_KINDS:
            ros_type = topics[kind][1]
            next_ns = clock.now_ns()
            for i in range(2 * (warmup + count)):
                next_ns = max(next_ns + DDS_INTERVAL_US * 1000, clock.now_ns())
                clock.sleep_until(next_ns)
                seq, path = i // 2, DDS_PATHS[i % 2]
                msg = _dds_message(kind, seq, clock.now_ns())
                started_ns = thread_cpu_ns()
                if path == "zmq":
                    socket.send_multipart(encode(msg), copy=False)
                else:
                    writers[kind].write(types.to_dds(messages.to_ros(msg, ros_type), ros_type))
                if seq >= warmup:
                    cpu_ns[kind][path].append(thread_cpu_ns() - started_ns)
        socket.send(_DDS_END.encode())
        costs.put(cpu_ns)
    finally:
        socket.close()
        context.term()
        del writers, keep


def _stamp_ns(msg: Message) -> int:
    """The send time the sender put in `msg`: a prediction's t_ref, else its capture time."""
    return msg.t_ref_ns if isinstance(msg, Prediction) else msg.t_capture_ns


def _dds_receive_blocking(endpoint: str, domain_id: int, warmup: int, ready: Any,
                          results: dict[str, Any]) -> None:
    """Receiver (this process): a ZeroMQ subscriber thread and a DDS reader thread, each
    decoding as a subscriber would (protocol.decode; from IDL, from_ros)."""
    from cyclonedds.core import InstanceState, ReadCondition, SampleState, ViewState, WaitSet
    from cyclonedds.internal import InvalidSample
    from cyclonedds.util import duration

    from fusion_node.ros2 import messages

    latencies: dict[str, dict[str, list[int]]] = {k: {p: [] for p in DDS_PATHS}
                                                  for k in DDS_KINDS}
    results["latencies_ns"] = latencies
    context = zmq.Context()
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    keep, readers, types = _dds_entities(domain_id, writer=False)
    topics = _dds_topics()
    kind_of = {reader: kind for kind, reader in readers.items()}
    waitset = WaitSet(keep[1])
    for reader in readers.values():
        waitset.attach(ReadCondition(reader, SampleState.Any | ViewState.Any
                                     | InstanceState.Any))
    stop = threading.Event()

    def dds_blocking() -> None:
        # ROS 2 headers carry no sequence number: the first `warmup` received are skipped.
        received = dict.fromkeys(DDS_KINDS, 0)
        while not stop.is_set():
            waitset.wait(duration(milliseconds=50))
            for reader, kind in kind_of.items():
                for sample in reader.take(64):
                    if isinstance(sample, InvalidSample):
                        continue
                    ros_type = topics[kind][1]
                    msg = messages.from_ros(ros_type, types.from_dds(sample, ros_type),
                                            _STREAMS.get(kind, kind))
                    t_recv_ns = time.monotonic_ns()
                    received[kind] += 1
                    if received[kind] > warmup:
                        latencies[kind]["dds"].append(t_recv_ns - _stamp_ns(msg))

    thread = threading.Thread(target=dds_blocking, name="bench-dds", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:  # ZeroMQ probe, and DDS writers matched
            if socket.poll(100) and socket.recv() == _PROBE and all(
                    r.get_subscription_matched_status().current_count for r in readers.values()):
                ready.set()
                break
        else:
            raise FusionError("no probe from the DDS bench sender")
        socket.setsockopt(zmq.RCVTIMEO, _RECV_TIMEOUT_MS)
        while True:
            parts = socket.recv_multipart(copy=False)
            if parts[0].bytes == _DDS_END.encode():
                break
            if parts[0].bytes == _PROBE:
                continue
            msg = decode(parts)
            t_recv_ns = time.monotonic_ns()
            kind = "joints" if isinstance(msg, JointState) else msg.stream
            if msg.seq >= warmup:
                latencies[kind]["zmq"].append(t_recv_ns - _stamp_ns(msg))
        time.sleep(0.2)  # the last DDS samples
    finally:
        stop.set()
        thread.join(2)
        socket.close()
        context.term()
        del readers, keep


def run_dds_bench(count: int = 500, warmup: int = 50, domain_id: int | None = None
                  ) -> dict[str, Any]:
    """Per kind (a joint state, a speech and an action prediction), interleaved: one-way
    latency over ZeroMQ (the node's path) and over DDS as ROS 2 topics (the bridge's path,
    with its QoS), and the sender's CPU time per message on each, which for DDS is what the
    bridge's thread spends per message. On a loopback-only Cyclone domain of its own."""
    import random

    if count < 1 or warmup < 0:
        raise ValueError(f"count must be >= 1 and warmup >= 0, got {count} and {warmup}")
    domain_id = random.randrange(150, 230) if domain_id is None else domain_id
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fusion-bench-") as tmp:
        endpoint = f"ipc://{Path(tmp) / 'dds.sock'}"
        spawn = mp.get_context("spawn")
        ready, costs = spawn.Event(), spawn.Queue()
        results: dict[str, Any] = {}
        errors: list[str] = []

        def receive() -> None:
            try:
                _dds_receive_blocking(endpoint, domain_id, warmup, ready, results)
            except Exception as exc:  # noqa: BLE001 - reported below, not lost
                errors.append(f"{type(exc).__name__}: {exc}")

        receiver = threading.Thread(target=receive, name="bench-dds-receiver", daemon=True)
        sender = spawn.Process(target=_dds_send_blocking, name="bench-dds-sender",
                               args=(endpoint, domain_id, count, warmup, ready, costs))
        receiver.start()
        sender.start()
        expected_s = 2 * (count + warmup) * len(DDS_KINDS) * DDS_INTERVAL_US / 1e6
        cpu_ns = _result_of(sender, costs, _START_TIMEOUT_S + 2 * expected_s)
        receiver.join(_RECV_TIMEOUT_MS / 1000 + 2)
        sender.join(5)
    if errors or cpu_ns is None or receiver.is_alive():
        raise FusionError(f"DDS bench failed: sender exit code {sender.exitcode}, receiver "
                          f"{errors[0] if errors else 'did not finish'}")
    kinds = {}
    for kind in DDS_KINDS:
        latency = {path: _percentiles_us(results["latencies_ns"][kind][path])
                   for path in DDS_PATHS}
        cpu = {path: _percentiles_us(cpu_ns[kind][path]) for path in DDS_PATHS}
        kinds[kind] = {"latency": latency, "publish_cpu": cpu,
                       "added_publish_cpu_p50_us": round(cpu["dds"]["p50_us"], 1),
                       "latency_ratio_p50": round(latency["dds"]["p50_us"]
                                                  / latency["zmq"]["p50_us"], 2)}
    from importlib.metadata import version

    return {"count": count, "warmup": warmup, "domain_id": domain_id,
            "cyclonedds": version("cyclonedds"), "interval_us": DDS_INTERVAL_US,
            "elapsed_s": round(time.monotonic() - started, 2), "kinds": kinds}
