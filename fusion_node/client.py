"""Client library for control loops: subscribe to the node's predictions.

Three forms, one socket each:
- `Client.latest(topic)`: non-blocking, conflated: the newest prediction received so far,
  for a loop that runs at its own rate (100–1000 Hz) and must never wait on the network;
- `for prediction in client`: blocking iteration over every prediction;
- `async for prediction in client.stream()`: the same in asyncio.

`ActionFollower` turns the stream of action chunks into one joint target for any time t,
with the temporal ensembling the action model is trained for.

Imports only numpy, msgpack and pyzmq, so it starts fast and runs where torch, OpenCV and
ONNX Runtime are not installed.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Self

import numpy as np
import zmq

from fusion_node.clock import Clock, MonotonicClock
from fusion_node.errors import ConfigError, ProtocolError
from fusion_node.protocol import Message, Prediction, decode
from fusion_node.security import ClientKeys
from fusion_node.transport import DEFAULT_HWM, DEFAULT_PUB


class Client:
    """A subscriber to the node's `pred.*` (and optionally `node.health`) topics.

    Malformed messages are counted in `rejected` and skipped, as in the node itself.

    A node bound beyond loopback admits only CURVE clients it lists: pass this client's
    `client_key` (its `.key_secret` file) and the node's `server_public_key` (its `.key`);
    docs/security.md.
    """

    def __init__(self, endpoint: str = DEFAULT_PUB, topics: Iterable[str] = ("pred.",),
                 context: zmq.Context | None = None, clock: Clock | None = None,
                 client_key: str | Path | None = None,
                 server_public_key: str | Path | None = None) -> None:
        if (client_key is None) != (server_public_key is None):
            raise ConfigError("Client: client_key and server_public_key go together")
        keys = (ClientKeys.load(client_key, server_public_key)
                if client_key is not None and server_public_key is not None else None)
        self._context = context or zmq.Context()
        self._owns_context = context is None
        self._clock = clock or MonotonicClock()
        self._socket = self._context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.RCVHWM, DEFAULT_HWM)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._topics = tuple(topics)
        for topic in self._topics:
            self._socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        if keys is not None:
            keys.apply(self._socket)
        self._socket.connect(endpoint)
        self._latest: dict[str, Message] = {}
        self.rejected: dict[str, int] = {}

    def _decode(self, parts: list) -> Message | None:
        try:
            return decode(parts, self._clock.now_ns())
        except ProtocolError as exc:
            self.rejected[exc.reason] = self.rejected.get(exc.reason, 0) + 1
            return None

    def latest(self, topic: str) -> Message | None:
        """The newest message on `topic` received so far, or None; never blocks.

        Pending messages are drained first, but only the newest of each topic is decoded:
        a loop that polls slowly pays for one decode per topic, not for the backlog.
        """
        newest: dict[bytes, list] = {}
        # ZMQ_EVENTS is one getsockopt; poll() would build a poller on every call.
        while int(self._socket.get(zmq.EVENTS)) & zmq.POLLIN:
            parts = self._socket.recv_multipart(copy=False)
            newest[parts[0].bytes] = parts
        for parts in newest.values():
            msg = self._decode(parts)
            if msg is not None:
                self._latest[msg.stream] = msg
        return self._latest.get(topic)

    def recv(self, timeout_ms: int | None = None) -> Message | None:
        """The next valid message, waiting at most `timeout_ms` (None: forever)."""
        while self._socket.poll(timeout_ms, zmq.POLLIN):
            msg = self._decode(self._socket.recv_multipart(copy=False))
            if msg is not None:
                self._latest[msg.stream] = msg
                return msg
        return None

    def __iter__(self) -> Iterator[Message]:
        while True:
            msg = self.recv()
            if msg is not None:
                yield msg

    async def stream(self) -> AsyncIterator[Message]:
        """Every valid message, without blocking the event loop."""
        import zmq.asyncio

        # The same socket seen through asyncio: use one form at a time.
        socket = zmq.asyncio.Socket.shadow(self._socket.underlying)
        while True:
            msg = self._decode(await socket.recv_multipart(copy=False))
            if msg is not None:
                self._latest[msg.stream] = msg
                yield msg

    def close(self) -> None:
        self._socket.close(linger=0)
        if self._owns_context:
            self._context.term()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ActionFollower:
    """Joint targets for any time from overlapping action chunks (temporal ensembling).

    Each chunk predicts targets at `step_times_ns`. For time t, every chunk that covers t
    gives its target, linearly interpolated between its steps; targets are averaged with
    weights exp(−k·i), i = 0 for the oldest chunk, as in action-chunking transformers: older
    chunks, made when t was further ahead, count slightly more, which smooths the motion.
    """

    def __init__(self, decay: float = 0.01, max_chunks: int = 32) -> None:
        self._decay = decay
        self._chunks: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=max_chunks)

    def add(self, prediction: Prediction) -> None:
        """Take a `pred.action` prediction; older or repeated chunks are ignored."""
        try:
            times = np.asarray(prediction.arrays["step_times_ns"], np.int64)
            actions = np.asarray(prediction.arrays["actions"], np.float64)
        except KeyError as exc:
            raise ProtocolError("bad_field", f"{prediction.stream} has no array {exc}") from None
        if self._chunks and times[0] <= self._chunks[-1][0][0]:
            return
        self._chunks.append((times, actions))

    def action_at(self, t_ns: int) -> np.ndarray | None:
        """The ensembled joint target for time `t_ns`, or None if no chunk covers it."""
        targets = []
        for times, actions in self._chunks:
            if times[0] <= t_ns <= times[-1]:
                step = int(np.searchsorted(times, t_ns, side="right")) - 1
                if step == len(times) - 1:
                    targets.append(actions[step])
                else:
                    alpha = (t_ns - times[step]) / (times[step + 1] - times[step])
                    targets.append(actions[step] + alpha * (actions[step + 1] - actions[step]))
        if not targets:
            return None
        weights = np.array([math.exp(-self._decay * i) for i in range(len(targets))])
        return np.asarray(np.tensordot(weights / weights.sum(), np.stack(targets), axes=1))
