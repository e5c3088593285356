"""ZeroMQ sockets that speak the wire protocol.

Publishers bind, subscribers connect. A PUB socket drops messages for a subscriber whose
queue is full (high-water mark), so a slow subscriber never blocks or grows the node.

Payloads of at least `ShmConfig.threshold_bytes` on a local endpoint (ipc://, inproc://,
loopback tcp://) travel through a shared-memory ring (fusion_node.shm, protocol.md §10);
subscribers resolve them into read-only views whose slot stays held until they are dropped.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
import zmq

from fusion_node.clock import Clock
from fusion_node.errors import ConfigError, ProtocolError
from fusion_node.protocol import AudioChunk, Frame, JointState, Message, decode, encode
from fusion_node.security import (
    ClientKeys,
    CurveServer,
    check_endpoint,
    is_loopback_or_ipc,
    restrict_ipc_socket,
    secure_ipc_directory,
)
from fusion_node.shm import ShmConfig, ShmLease, ShmReader, ShmWriter

logger = logging.getLogger(__name__)

# Where the node publishes predictions and node.health unless a launch file says otherwise.
DEFAULT_PUB = "tcp://127.0.0.1:5599"
DEFAULT_HWM = 100
DEFAULT_SHM = ShmConfig()
_ARRAY_KINDS = (Frame, AudioChunk, JointState)


def check_bind_endpoint(endpoint: str, authenticated: bool = False) -> None:
    """Refuse endpoints that would expose unauthenticated sensor data beyond this host
    (fusion_node.security: loopback and ipc:// need no keys, anything else CURVE)."""
    check_endpoint(endpoint, authenticated, "bind endpoint")


class Publisher:
    """A PUB socket that sends protocol messages; owned by one thread.

    `shm` chooses the shared-memory path for large payloads on a local endpoint; None sends
    every payload over ZeroMQ (needed when subscribers that read no shared memory, such as
    a foreign-language client, subscribe to large messages).

    `curve` authenticates the socket (required to bind beyond loopback): a `CurveServer`
    (the node: only its allowed clients may subscribe) or `ClientKeys` (a source publishing
    into a node: only the holder of that node's secret key may subscribe)."""

    def __init__(self, context: zmq.Context, endpoint: str, hwm: int = DEFAULT_HWM,
                 shm: ShmConfig | None = DEFAULT_SHM,
                 curve: CurveServer | ClientKeys | None = None) -> None:
        check_bind_endpoint(endpoint, authenticated=curve is not None)
        secure_ipc_directory(endpoint)
        self._curve = curve
        self.endpoint = endpoint
        self.shm_config = shm if shm is not None and is_loopback_or_ipc(endpoint) else None
        self.shm: ShmWriter | None = None
        self._shm_lock = threading.Lock()
        self._shm_threshold = (self.shm_config.threshold_bytes if self.shm_config is not None
                               else 1 << 62)
        self._socket = context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.SNDHWM, hwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        if isinstance(curve, CurveServer):
            curve.protect(self._socket, "pub")
        elif curve is not None:
            curve.apply(self._socket)
        try:
            self._socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise ConfigError(f"cannot bind {endpoint!r}: {exc}") from None
        restrict_ipc_socket(endpoint)
        # An ephemeral tcp port (":*") resolves to the real one here.
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def send(self, msg: Message) -> None:
        parts = encode(msg)
        if len(parts) == 3 and len(parts[2]) >= self._shm_threshold:
            parts = (self.shm or self._shm_writer()).wrap(parts)
        # NOBLOCK: a PUB socket never blocks, but be explicit that sending cannot stall.
        self._socket.send_multipart(parts, copy=False, flags=zmq.NOBLOCK)

    def loan(self, stream: str, shape: tuple[int, ...], dtype: Any = np.uint8,
             wait_ms: float = 0) -> np.ndarray:
        """A writable array to fill and then send on `stream` without any copy.

        On the shared-memory path it is a slot of the stream's ring: write the frame into it
        (e.g. the camera's decoder output), then `send` a message carrying exactly this
        array. Several may be out at once, and the producer's own thread (a capture thread)
        may ask for them; one dropped without being sent gives its slot back. A payload
        that does not go through shared memory (none configured, or below its threshold)
        gets an ordinary array, and `send` works as usual.

        Raises `fusion_node.shm.RingFull` when every slot of the ring is held by
        subscribers or lent, after waiting up to `wait_ms` for one to be released (0, the
        default: never waits). With `wait_ms` > 0 it also waits for a slot whose frame every
        subscriber has taken: the producer then goes at its slowest subscriber's pace
        (back-pressure) and no subscriber loses a frame to a reused slot."""
        dtype = np.dtype(dtype)
        if int(np.prod(shape)) * dtype.itemsize >= self._shm_threshold:
            array = (self.shm or self._shm_writer()).loan(stream.encode(), shape, dtype,
                                                          wait_ms)
            if array is not None:
                return array
        return np.empty(shape, dtype)

    def _shm_writer(self) -> ShmWriter:
        # Made on the first large payload or loan (a publisher of small messages maps
        # nothing); a capture thread's loan and the sending thread may get here together.
        with self._shm_lock:
            if self.shm is None:
                assert self.shm_config is not None  # the threshold is finite only with one
                self.shm = ShmWriter(self.shm_config)
            return self.shm

    def send_parts(self, parts: list) -> None:
        self._socket.send_multipart(parts, copy=False, flags=zmq.NOBLOCK)

    def close(self) -> None:
        if isinstance(self._curve, CurveServer):
            self._curve.unprotect(self._socket)
        self._socket.close(linger=0)
        if self.shm is not None:
            self.shm.close()


class Subscriber:
    """A SUB socket connected to one or more publishers; decodes and validates messages.

    Malformed messages are counted by reason in `rejected` and skipped, never raised; so are
    shared-memory frames lost because this subscriber was too slow (`stale_generation`: the
    publisher reused the slot before this subscriber read its header; also counted per
    stream in `shm_dropped`). With `shm` (the default) arrays sent through shared memory are
    read-only views whose slot the publisher will not reuse while they are referenced: drop
    (or copy) frames you are done with, or the ring fills up. An array that arrives inline
    on a stream that came through shared memory before is a publisher's fallback (its ring
    was full): counted per stream in `shm_fallbacks` and logged once per stream.

    `curve`: `ClientKeys` subscribe to a CURVE-protected publisher; with a `CurveServer` (the
    node) local endpoints stay on a plain socket and the others go through a second, CURVE
    server socket, so only allowed clients can publish into it.
    """

    def __init__(self, context: zmq.Context, endpoints: Iterable[str], clock: Clock,
                 topics: Iterable[str] = ("",), hwm: int = DEFAULT_HWM,
                 shm: bool = True, curve: CurveServer | ClientKeys | None = None) -> None:
        self._clock = clock
        # Leases are stamped on the host's CLOCK_MONOTONIC, whatever clock stamps receipt.
        self._shm = ShmReader() if shm else None
        self._curve = curve
        endpoints = list(endpoints)
        topics = tuple(topics)
        self._poller = zmq.Poller()
        self._sockets: list[zmq.Socket] = []
        remote = ([e for e in endpoints if not is_loopback_or_ipc(e)]
                  if isinstance(curve, CurveServer) else [])
        local = [e for e in endpoints if e not in remote]
        self._socket = self._open(context, local, topics, hwm,
                                  curve if isinstance(curve, ClientKeys) else None)
        self._protected: zmq.Socket | None = None
        if remote:
            self._protected = self._open(context, remote, topics, hwm, curve)
        self.rejected: Counter[str] = Counter()
        self.last_error: str = ""
        self.shm_dropped: Counter[str] = Counter()
        self.shm_fallbacks: Counter[str] = Counter()
        self._shm_streams: set[str] = set()  # streams seen in shared memory

    def _open(self, context: zmq.Context, endpoints: list[str], topics: tuple[str, ...],
              hwm: int, curve: CurveServer | ClientKeys | None) -> zmq.Socket:
        socket = context.socket(zmq.SUB)
        socket.setsockopt(zmq.RCVHWM, hwm)
        socket.setsockopt(zmq.LINGER, 0)
        if isinstance(curve, CurveServer):
            curve.protect(socket, "sub")
        elif curve is not None:
            curve.apply(socket)
        for topic in topics:
            socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        for endpoint in endpoints:
            socket.connect(endpoint)
        self._poller.register(socket, zmq.POLLIN)
        self._sockets.append(socket)
        return socket

    def recv(self, timeout_ms: int) -> Message | None:
        """Next valid message, or None if none arrived within `timeout_ms`. Rejected
        messages are counted and skipped; waiting goes on until the timeout."""
        deadline_ns = self._clock.now_ns() + timeout_ms * 1_000_000
        while ready := self._poller.poll(timeout_ms):
            parts = ready[0][0].recv_multipart(copy=False)
            t_receive_ns = self._clock.now_ns()
            if self._shm is not None:
                self._shm.last_lease = None
            try:
                msg = decode(parts, t_receive_ns, self._shm)
            except ProtocolError as exc:
                self.rejected[exc.reason] += 1
                self.last_error = str(exc)
                if exc.reason == "stale_generation":
                    self.shm_dropped[parts[0].bytes.decode(errors="replace")] += 1
            else:
                if self._shm is not None and type(msg) in _ARRAY_KINDS:
                    self._note_path(self._shm, msg.stream)
                return msg
            timeout_ms = max(0, (deadline_ns - self._clock.now_ns()) // 1_000_000)
        return None

    def _note_path(self, shm: ShmReader, stream: str) -> None:
        if shm.last_lease is not None:
            self._shm_streams.add(stream)
        elif stream in self._shm_streams:
            self.shm_fallbacks[stream] += 1
            if self.shm_fallbacks[stream] == 1:
                logger.warning("%s: a payload arrived inline on a stream that uses shared "
                               "memory: its publisher's ring was full (counted in "
                               "shm_fallbacks, logged once)", stream)

    def shm_stats(self) -> dict[str, Any]:
        """What shared memory cost this subscriber: frames lost whole per stream (`dropped`),
        publishers' inline fallbacks per stream, frames copied for want of a release row."""
        return {"dropped": dict(self.shm_dropped), "fallbacks": dict(self.shm_fallbacks),
                "copied": self._shm.copied if self._shm is not None else 0}

    @property
    def last_lease(self) -> ShmLease | None:
        """The lease of the last shared-memory array `recv` returned (None if none yet)."""
        return self._shm.last_lease if self._shm is not None else None

    def close(self) -> None:
        for socket in self._sockets:
            if isinstance(self._curve, CurveServer):
                self._curve.unprotect(socket)
            socket.close(linger=0)
        if self._shm is not None:
            self._shm.close()
