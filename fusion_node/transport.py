"""ZeroMQ sockets that speak the wire protocol.

Publishers bind, subscribers connect. A PUB socket drops messages for a subscriber whose
queue is full (high-water mark), so a slow subscriber never blocks or grows the node.

Payloads of at least `ShmConfig.threshold_bytes` on a local endpoint (ipc://, inproc://,
loopback tcp://) travel through a shared-memory ring (fusion_node.shm, protocol.md §10);
subscribers resolve them into read-only views valid for the ring's lease.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import zmq

from fusion_node.clock import Clock
from fusion_node.errors import ConfigError, ProtocolError
from fusion_node.protocol import Message, decode, encode
from fusion_node.shm import ShmConfig, ShmLease, ShmReader, ShmWriter

DEFAULT_HWM = 100
DEFAULT_SHM = ShmConfig()


def is_local_endpoint(endpoint: str) -> bool:
    """True if every peer of `endpoint` is on this host, so shared memory can reach it."""
    scheme = endpoint.split("://", 1)[0]
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = urlsplit(endpoint).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind_endpoint(endpoint: str) -> None:
    """Refuse endpoints that would expose unauthenticated sensor data beyond this host."""
    scheme = endpoint.split("://", 1)[0]
    if scheme in ("ipc", "inproc"):
        return
    if scheme != "tcp":
        raise ConfigError(f"endpoint {endpoint!r}: scheme must be ipc://, inproc:// or tcp://")
    host = urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(f"endpoint {endpoint!r} is not loopback; binding it needs CURVE "
                          "authentication, which this node does not enable")


class Publisher:
    """A PUB socket that sends protocol messages; owned by one thread.

    `shm` chooses the shared-memory path for large payloads on a local endpoint; None sends
    every payload over ZeroMQ (needed when subscribers that read no shared memory, such as
    a foreign-language client, subscribe to large messages)."""

    def __init__(self, context: zmq.Context, endpoint: str, hwm: int = DEFAULT_HWM,
                 shm: ShmConfig | None = DEFAULT_SHM) -> None:
        check_bind_endpoint(endpoint)
        self.endpoint = endpoint
        self.shm_config = shm if shm is not None and is_local_endpoint(endpoint) else None
        # Created on the first large payload: a publisher of small messages maps nothing.
        self.shm: ShmWriter | None = None
        self._shm_threshold = (self.shm_config.threshold_bytes if self.shm_config is not None
                               else 1 << 62)
        self._socket = context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.SNDHWM, hwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        try:
            self._socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self._socket.close()
            raise ConfigError(f"cannot bind {endpoint!r}: {exc}") from None
        # An ephemeral tcp port (":*") resolves to the real one here.
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def send(self, msg: Message) -> None:
        parts = encode(msg)
        if len(parts) == 3 and len(parts[2]) >= self._shm_threshold:
            if self.shm is None:
                assert self.shm_config is not None  # the threshold is finite only with one
                self.shm = ShmWriter(self.shm_config)
            parts = self.shm.wrap(parts)
        # NOBLOCK: a PUB socket never blocks, but be explicit that sending cannot stall.
        self._socket.send_multipart(parts, copy=False, flags=zmq.NOBLOCK)

    def loan(self, stream: str, shape: tuple[int, ...], dtype: Any = np.uint8) -> np.ndarray:
        """A writable array to fill and then send on `stream` without any copy.

        On the shared-memory path it is a slot of the stream's ring: write the frame into it
        (e.g. the camera's decoder output), then `send` a message carrying exactly this
        array before the next `loan` on the stream. Otherwise (no shared memory, small, or
        every slot leased) it is an ordinary array and `send` works as usual."""
        dtype = np.dtype(dtype)
        if int(np.prod(shape)) * dtype.itemsize >= self._shm_threshold:
            if self.shm is None:
                assert self.shm_config is not None
                self.shm = ShmWriter(self.shm_config)
            array = self.shm.loan(stream.encode(), shape, dtype)
            if array is not None:
                return array
        return np.empty(shape, dtype)

    def send_parts(self, parts: list) -> None:
        self._socket.send_multipart(parts, copy=False, flags=zmq.NOBLOCK)

    def close(self) -> None:
        self._socket.close(linger=0)
        if self.shm is not None:
            self.shm.close()


class Subscriber:
    """A SUB socket connected to one or more publishers; decodes and validates messages.

    Malformed messages are counted by reason in `rejected` and skipped, never raised; so are
    shared-memory frames lost because this subscriber was too slow (`stale_generation`,
    `lease_expired`). With `shm` (the default) arrays sent through shared memory are views
    valid until `last_lease.expires_ns`; copy what you keep longer.
    """

    def __init__(self, context: zmq.Context, endpoints: Iterable[str], clock: Clock,
                 topics: Iterable[str] = ("",), hwm: int = DEFAULT_HWM,
                 shm: bool = True) -> None:
        self._clock = clock
        # Leases are stamped on the host's CLOCK_MONOTONIC, whatever clock stamps receipt.
        self._shm = ShmReader() if shm else None
        self._socket = context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.RCVHWM, hwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        for topic in topics:
            self._socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        for endpoint in endpoints:
            self._socket.connect(endpoint)
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)
        self.rejected: Counter[str] = Counter()
        self.last_error: str = ""

    def recv(self, timeout_ms: int) -> Message | None:
        """Next valid message, or None if none arrived within `timeout_ms`. Rejected
        messages are counted and skipped; waiting goes on until the timeout."""
        deadline_ns = self._clock.now_ns() + timeout_ms * 1_000_000
        while self._poller.poll(timeout_ms):
            parts = self._socket.recv_multipart(copy=False)
            t_receive_ns = self._clock.now_ns()
            if self._shm is not None:
                self._shm.last_lease = None
            try:
                return decode(parts, t_receive_ns, self._shm)
            except ProtocolError as exc:
                self.rejected[exc.reason] += 1
                self.last_error = str(exc)
            timeout_ms = max(0, (deadline_ns - self._clock.now_ns()) // 1_000_000)
        return None

    @property
    def last_lease(self) -> ShmLease | None:
        """The lease of the last shared-memory array `recv` returned (None if none yet)."""
        return self._shm.last_lease if self._shm is not None else None

    def close(self) -> None:
        self._socket.close(linger=0)
        if self._shm is not None:
            self._shm.close()
