"""ZeroMQ sockets that speak the wire protocol.

Publishers bind, subscribers connect. A PUB socket drops messages for a subscriber whose
queue is full (high-water mark), so a slow subscriber never blocks or grows the node.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable
from urllib.parse import urlsplit

import zmq

from fusion_node.clock import Clock
from fusion_node.errors import ConfigError, ProtocolError
from fusion_node.protocol import Message, decode, encode

DEFAULT_HWM = 100


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
    """A PUB socket that sends protocol messages; owned by one thread."""

    def __init__(self, context: zmq.Context, endpoint: str, hwm: int = DEFAULT_HWM) -> None:
        check_bind_endpoint(endpoint)
        self.endpoint = endpoint
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
        # NOBLOCK: a PUB socket never blocks, but be explicit that sending cannot stall.
        self._socket.send_multipart(encode(msg), copy=False, flags=zmq.NOBLOCK)

    def send_parts(self, parts: list) -> None:
        self._socket.send_multipart(parts, copy=False, flags=zmq.NOBLOCK)

    def close(self) -> None:
        self._socket.close(linger=0)


class Subscriber:
    """A SUB socket connected to one or more publishers; decodes and validates messages.

    Malformed messages are counted by reason in `rejected` and skipped, never raised.
    """

    def __init__(self, context: zmq.Context, endpoints: Iterable[str], clock: Clock,
                 topics: Iterable[str] = ("",), hwm: int = DEFAULT_HWM) -> None:
        self._clock = clock
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
        """Next valid message, or None if none arrived within `timeout_ms`."""
        while self._poller.poll(timeout_ms):
            parts = self._socket.recv_multipart(copy=False)
            t_receive_ns = self._clock.now_ns()
            try:
                return decode(parts, t_receive_ns)
            except ProtocolError as exc:
                self.rejected[exc.reason] += 1
                self.last_error = str(exc)
            timeout_ms = 0
        return None

    def close(self) -> None:
        self._socket.close(linger=0)
