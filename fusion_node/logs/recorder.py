"""The live recorder: what enters the node's alignment buffer, and each window cut from it,
queued without blocking and written to an MCAP log (`mcap_format.LogWriter`) by a thread of
its own. `record_endpoints_blocking` records sockets instead (`fusion-node record`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from typing import Any

import zmq

from fusion_node.alignment import DEFAULT_MAX_FUTURE_NS, AlignmentBuffer, InputSpec, Window
from fusion_node.clock import Clock, MonotonicClock, measure_wall_clock, thread_cpu_ns
from fusion_node.errors import ProtocolError, ReplayError
from fusion_node.host.threads import raise_thread_niceness
from fusion_node.logs.mcap_format import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_FLUSH_INTERVAL_NS,
    DEFAULT_PREVIEW_HZ,
    WALL_CLOCK_KEY,
    LogWriter,
    WindowCut,
    topic_matches,
)
from fusion_node.protocol import (
    AudioChunk,
    Frame,
    JointState,
    Message,
    Prediction,
    decode,
)
from fusion_node.shm import in_shared_memory

log = logging.getLogger(__name__)

# About 4 s of the default sensors (28 MB/s of 640x480 frames); beyond that, drop and count.
DEFAULT_QUEUE_BYTES = 128 << 20
DEFAULT_QUEUE_MESSAGES = 8192
_IDLE_WAIT_S = 0.01
_CLOSE_TIMEOUT_S = 30.0
_RECV_TIMEOUT_MS = 100
_SUBSCRIBER_HWM = 1000


def queued_nbytes(msg: Message | WindowCut) -> int:
    """About how much memory `msg` holds while it waits in a queue."""
    if isinstance(msg, WindowCut):
        return 64
    if isinstance(msg, Frame):
        return msg.image.nbytes
    if isinstance(msg, AudioChunk):
        return msg.samples.nbytes
    if isinstance(msg, JointState):
        return 24 * len(msg.names)
    if isinstance(msg, Prediction):
        return 1024 + sum(a.nbytes for a in msg.arrays.values())
    return 4096  # health: a few KB of msgpack



def owned(msg: Message | WindowCut) -> Message | WindowCut:
    """`msg` with arrays that view a shared-memory ring copied: a queued frame may wait
    longer than the ring's lease, after which its slot is rewritten."""
    if isinstance(msg, Frame) and in_shared_memory(msg.image):
        return dataclasses.replace(msg, image=msg.image.copy())
    if isinstance(msg, AudioChunk) and in_shared_memory(msg.samples):
        return dataclasses.replace(msg, samples=msg.samples.copy())
    if isinstance(msg, JointState) and in_shared_memory(msg.position):
        return dataclasses.replace(msg, position=msg.position.copy(),
                                   velocity=msg.velocity.copy(), effort=msg.effort.copy())
    return msg


class Recorder:
    """Records messages on its own writer thread through a bounded queue.

    `offer` never blocks and never touches the disk, so the node's receiver, publisher and
    event loop can call it on their hot paths. When the queue is full (the disk is slower
    than the sensors) the offered message is dropped and counted per topic: `stats()`, the
    node's health and the log's end metadata report the drops.
    """

    def __init__(self, path: str, clock: Clock, *, topics: Sequence[str] = (),
                 duration_ns: int | None = None, compression: str = "lz4",
                 chunk_size: int = DEFAULT_CHUNK_SIZE, preview_hz: float = DEFAULT_PREVIEW_HZ,
                 flush_interval_ns: int = DEFAULT_FLUSH_INTERVAL_NS,
                 metadata: dict[str, str] | None = None,
                 max_queue_bytes: int = DEFAULT_QUEUE_BYTES,
                 max_queue_messages: int = DEFAULT_QUEUE_MESSAGES,
                 overwrite: bool = False) -> None:
        if isinstance(clock, MonotonicClock):
            # Lets viewers show this log's monotonic stamps as wall time (Foxglove).
            metadata = {WALL_CLOCK_KEY: measure_wall_clock().to_json(), **(metadata or {})}
        # Opened here, so that a bad path fails at start-up in the caller's thread.
        self._writer = LogWriter(path, compression=compression, chunk_size=chunk_size,
                                 preview_hz=preview_hz, flush_interval_ns=flush_interval_ns,
                                 metadata=metadata, overwrite=overwrite)
        self.path = path
        self._clock = clock
        self._topics = tuple(topics)
        self._duration_ns = duration_ns
        self._end_ns: int | None = None
        self._max_bytes = max_queue_bytes
        self._max_messages = max_queue_messages
        self._queue: deque[tuple[Message | WindowCut, int, Sequence[Any] | None, int]] = \
            deque()
        self._queued_bytes = 0
        self._peak_bytes = 0
        self._lock = threading.Lock()
        self._accepting = True
        self._stopping = threading.Event()
        self.priority = "default"
        self._thread = threading.Thread(target=self._run_blocking, name="recorder", daemon=True)
        self.dropped: Counter[str] = Counter()
        self.written = 0
        self.cpu_ns = 0
        self.error = ""

    def start(self) -> None:
        if self._duration_ns is not None:
            self._end_ns = self._clock.now_ns() + self._duration_ns
        self._thread.start()

    def offer(self, msg: Message | WindowCut, log_time_ns: int | None = None,
              parts: Sequence[Any] | None = None) -> bool:
        """Queue `msg` (received at `log_time_ns`, default its `t_receive_ns`) for writing;
        False if it is not recorded (not selected, recording over, or dropped)."""
        # Window cuts are tiny and what makes a replay exact: a topic selection keeps them.
        if (self._topics and not isinstance(msg, WindowCut)
                and not topic_matches(msg.stream, self._topics)):
            return False
        if log_time_ns is not None:
            t_ns = log_time_ns
        elif isinstance(msg, WindowCut):
            raise ValueError("a window cut needs its log time")
        else:
            t_ns = msg.t_receive_ns
        msg = owned(msg)
        size = queued_nbytes(msg)
        with self._lock:
            if not self._accepting:
                if self.error:
                    self.dropped[msg.stream] += 1
                return False
            if self._end_ns is not None and t_ns >= self._end_ns:
                self._accepting = False  # the writer thread finishes the file now
                return False
            if (self._queued_bytes + size > self._max_bytes
                    or len(self._queue) >= self._max_messages):
                self.dropped[msg.stream] += 1
                return False
            self._queue.append((msg, t_ns, parts, size))
            self._queued_bytes += size
            self._peak_bytes = max(self._peak_bytes, self._queued_bytes)
        return True

    @property
    def finished(self) -> bool:
        """The recording is over (duration reached or stopped) and the file is closed."""
        return not self._thread.is_alive() and self._thread.ident is not None

    def stats(self) -> dict[str, Any]:
        with self._lock:
            dropped = dict(self.dropped)
            queued = len(self._queue)
            queued_bytes = self._queued_bytes
            peak_bytes = self._peak_bytes
        return {"path": self.path, "written": self.written, "dropped": dropped,
                "queued": queued, "queued_mb": round(queued_bytes / 2**20, 1),
                "peak_queued_mb": round(peak_bytes / 2**20, 1),
                "cpu_s": round(self.cpu_ns / 1e9, 3), "priority": self.priority,
                "recording": not self.finished,
                "error": self.error}

    def close(self) -> None:
        """Write what is queued, finish the file and stop the writer thread."""
        self._stopping.set()
        if self._thread.ident is None:  # never started: still leave a complete file
            self._thread.start()
        self._thread.join(_CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            log.error("recorder: %s not finished after %.0f s", self.path, _CLOSE_TIMEOUT_S)

    def _pop(self) -> tuple[Message | WindowCut, int, Sequence[Any] | None, int] | None:
        with self._lock:
            if not self._queue:
                return None
            item = self._queue.popleft()
            self._queued_bytes -= item[3]
            return item

    def _run_blocking(self) -> None:
        self.priority = raise_thread_niceness()
        writer = self._writer
        cpu_start_ns = thread_cpu_ns()
        try:
            while True:
                item = self._pop()
                if item is None:
                    if self._stopping.is_set() or not self._accepting:
                        break
                    writer.flush_if_due(self._clock.now_ns())
                    self._stopping.wait(_IDLE_WAIT_S)
                    continue
                msg, t_ns, parts, _ = item
                if isinstance(msg, WindowCut):
                    writer.write_cut(msg, t_ns)
                else:
                    writer.write(msg, t_ns, parts)
                # Hand the GIL to a thread waiting for it (the publisher at a deadline): this cut
                # the p99 publish jitter that recording adds from about 1 ms to 0.3 ms.
                time.sleep(0)
                self.written += 1
                writer.flush_if_due(self._clock.now_ns())
                self.cpu_ns = thread_cpu_ns() - cpu_start_ns
            with self._lock:
                self._accepting = False
                dropped = dict(self.dropped)
            writer.close({"dropped": json.dumps(dropped),
                          "writer_cpu_s": f"{(thread_cpu_ns() - cpu_start_ns) / 1e9:.3f}"})
        except (OSError, ReplayError) as exc:
            with self._lock:
                self._accepting = False
                self.error = f"{self.path}: {exc}"
                self._queue.clear()
                self._queued_bytes = 0
            log.error("recorder stopped: %s", self.error)
            writer.abort()
        self.cpu_ns = thread_cpu_ns() - cpu_start_ns


class RecordingBuffer(AlignmentBuffer):
    """The node's alignment buffer while it records.

    Every message entering it and every window cut from it are stamped under one lock, in
    the order they happen, and offered to the recorder. A message's log time is then "when
    it became visible to the engines", and a window holds exactly the messages logged before
    its cut: replaying with "log" timing rebuilds each live window, whatever threads the GIL
    ran when. (Stamps taken outside that lock, before or after the push, let a late sample
    land on the wrong side of a cut about once per 10 s of the default robot.)
    """

    def __init__(self, capacities: dict[str, int], clock: Clock,
                 max_future_ns: int = DEFAULT_MAX_FUTURE_NS) -> None:
        super().__init__(capacities, max_future_ns)
        self._order = threading.Lock()
        self._clock = clock
        self._last_ns = 0
        self._recorder: Recorder | None = None
        self._topics: dict[int, str] = {}

    def attach(self, recorder: Recorder, runners: Iterable[Any]) -> None:
        """Record into `recorder`; runners' windows are named by their prediction topic."""
        self._topics = {id(r.binding.spec): r.topic for r in runners}
        self._recorder = recorder

    def _stamp(self) -> int:
        # Strictly increasing, so the order of pushes and cuts is never a tie in a replay.
        self._last_ns = max(self._clock.now_ns(), self._last_ns + 1)
        return self._last_ns

    def push(self, msg: Message) -> bool:
        with self._order:
            t_ns = self._stamp()
            # Checked against the log time, which a replay gives the message as its receipt:
            # the replay refuses exactly the samples the live node refused.
            stored, _evicted = self._store(msg, t_ns if msg.t_receive_ns else 0)
        if self._recorder is not None:  # a bounded, non-blocking queue: no disk I/O here
            self._recorder.offer(msg, log_time_ns=t_ns)
        return stored  # the evicted sample is released here, after both locks

    def window(self, t_ref_ns: int, spec: tuple[InputSpec, ...]) -> Window:
        with self._order:
            window = super().window(t_ref_ns, spec)
            t_ns = self._stamp()
        topic = self._topics.get(id(spec))
        if self._recorder is not None and topic is not None:
            self._recorder.offer(WindowCut(topic, t_ref_ns), log_time_ns=t_ns)
        return window


def node_metadata(config: Any, runners: Sequence[Any]) -> dict[str, str]:
    """What a replay needs from the node that recorded: its launch config and the hash of
    each engine's model, by topic."""
    return {"source": "node",
            "config": json.dumps(dataclasses.asdict(config), default=str),
            "model_hashes": json.dumps({r.topic: r.engine.model_hash for r in runners})}


def record_endpoints_blocking(recorder: Recorder, context: zmq.Context,
                              endpoints: Sequence[str], clock: Clock, stop: threading.Event,
                              end_ns: int | None = None) -> Counter[str]:
    """Subscribe to `endpoints` and record what arrives, byte for byte, until `stop` is set,
    `end_ns` passes or the recorder finishes. Returns rejected (malformed) messages by reason:
    they are not recorded."""
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.RCVHWM, _SUBSCRIBER_HWM)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    rejected: Counter[str] = Counter()
    try:
        for endpoint in endpoints:
            socket.connect(endpoint)
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        while not stop.is_set() and not recorder.finished:
            if end_ns is not None and clock.now_ns() >= end_ns:
                break
            if not poller.poll(_RECV_TIMEOUT_MS):
                continue
            parts = socket.recv_multipart(copy=False)
            t_receive_ns = clock.now_ns()
            try:
                msg = decode(parts, t_receive_ns)
            except ProtocolError as exc:
                rejected[exc.reason] += 1
                continue
            recorder.offer(msg, parts=parts)
    finally:
        socket.close(linger=0)
    return rejected
