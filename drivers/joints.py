"""Joint states from a robot controller that publishes protocol `joints` messages on ZeroMQ.

The controller stamps its states on the node clock (or is mapped onto it upstream); this
driver keeps `t_capture_ns` and re-emits each state under its own stream name.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from dataclasses import dataclass

import zmq

from fusion_node.clock import Clock
from fusion_node.errors import ConfigError, DriverError, EndOfStream
from fusion_node.protocol import JointState
from fusion_node.transport import Subscriber

_POLL_MS = 50  # bounds how long disconnect waits for a receive in progress


@dataclass(frozen=True, slots=True)
class ZmqJointSubscriberConfig:
    """Subscribe to `endpoint` (the controller binds its PUB socket; we connect).

    `topic` filters by the controller's stream name prefix ("" takes all); `timeout_ms`
    without a valid joint state is a fault.
    """

    stream: str
    endpoint: str
    topic: str = ""
    timeout_ms: float = 2000.0

    def __post_init__(self) -> None:
        if self.timeout_ms <= 0:
            raise ConfigError(f"stream {self.stream!r}: timeout_ms is {self.timeout_ms}, "
                              "must be > 0")


class ZmqJointSubscriber:
    """Re-emits a controller's joint states; counts what it rejects in `rejected`.

    Rejection reasons: the subscriber's protocol errors (malformed messages), `wrong_kind`
    (not a joints message), `not_monotonic` (stamp not after the previous state's),
    `names_changed` (joint names differ from the first state's).
    """

    def __init__(self, config: ZmqJointSubscriberConfig, clock: Clock,
                 context: zmq.Context | None = None) -> None:
        self.config = config
        self.stream = config.stream
        self._clock = clock
        self._context = context
        self._owns_context = context is None
        self._timeout_ns = round(config.timeout_ms * 1e6)
        self._subscriber: Subscriber | None = None
        self._lock = threading.Lock()  # one receive at a time; close waits for it
        self._stop = threading.Event()
        self._rejected: Counter[str] = Counter()
        self._names: tuple[str, ...] | None = None
        self._last_t_ns: int | None = None
        self._seq = 0

    @property
    def rejected(self) -> Counter[str]:
        """Rejected messages by reason, malformed ones included."""
        total = Counter(self._rejected)
        subscriber = self._subscriber
        if subscriber is not None:
            # dict.copy is atomic under the GIL; the receive thread may be counting.
            total.update(dict.copy(subscriber.rejected))
        return total

    @property
    def _name(self) -> str:
        return f"joints {self.config.endpoint!r} ({self.stream})"

    async def connect(self) -> None:
        if self._context is None:
            self._context = zmq.Context()
        self._stop.clear()
        self._subscriber = Subscriber(self._context, [self.config.endpoint], self._clock,
                                      topics=[self.config.topic])

    async def recv(self) -> JointState:
        return await asyncio.to_thread(self._recv_blocking)

    def _recv_blocking(self) -> JointState:
        with self._lock:
            subscriber = self._subscriber
            if subscriber is None:
                raise DriverError(f"{self._name} is not connected")
            deadline_ns = self._clock.now_ns() + self._timeout_ns
            while not self._stop.is_set():
                msg = subscriber.recv(_POLL_MS)
                if msg is not None:
                    state = self._accept(msg)
                    if state is not None:
                        return state
                if self._clock.now_ns() >= deadline_ns:
                    raise DriverError(f"{self._name}: no valid joint state for "
                                      f"{self.config.timeout_ms} ms")
            raise EndOfStream(f"{self._name} disconnected")

    def _accept(self, msg: object) -> JointState | None:
        if not isinstance(msg, JointState):
            self._rejected["wrong_kind"] += 1
            return None
        if self._last_t_ns is not None and msg.t_capture_ns <= self._last_t_ns:
            self._rejected["not_monotonic"] += 1
            return None
        if self._names is None:
            self._names = msg.names
        elif msg.names != self._names:
            self._rejected["names_changed"] += 1
            return None
        self._last_t_ns = msg.t_capture_ns
        state = JointState(self.stream, self._seq, msg.t_capture_ns, msg.names, msg.position,
                           msg.velocity, msg.effort)
        self._seq += 1
        return state

    async def disconnect(self) -> None:
        self._stop.set()
        await asyncio.to_thread(self._close_blocking)

    def _close_blocking(self) -> None:
        with self._lock:  # a receive in progress sees the stop flag within one poll
            subscriber, self._subscriber = self._subscriber, None
            if subscriber is not None:
                self._rejected.update(subscriber.rejected)
                subscriber.close()
            if self._owns_context and self._context is not None:
                self._context.term()
                self._context = None
