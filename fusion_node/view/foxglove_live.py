"""The node's live Foxglove WebSocket server: `[view] foxglove = "127.0.0.1:8765"`.

Connect with the Foxglove app (Open connection → Foxglove WebSocket → ws://127.0.0.1:8765)
and import docs/foxglove-layout.json: the topics and the conversion are those of the file
export (`fusion_node.view.foxglove`), with stamps in wall time through a monotonic↔wall
pair measured when the server starts.

It runs in the node's process, off its real-time path: the node offers it what enters the
alignment buffer (sensor samples, its own predictions) and each node.health; `offer` never
blocks and never converts. A thread of its own converts (JSON, base64 previews, JPEG mouth
crops) and logs to foxglove-sdk's server, which queues per client. What is dropped is
counted in node.health's `foxglove`:
  - `dropped`: by stream, the oldest queued messages when conversion falls behind (a live
    view wants the newest);
  - `slow_client_events`: the SDK's outbox for a client that reads too slowly filled and
    it dropped that client's oldest messages (the SDK reports each time, not how many).
While no client subscribes to anything, sensor samples after each stream's first are not
queued: counted as `unwatched`, not as drops. Predictions and health always are, so the
cumulative counts they carry stay right. Every topic the launch file implies is advertised
from the start (`FoxgloveTopics.declare`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from typing import Any

from fusion_node.clock import measure_wall_clock
from fusion_node.config import DRIVER_KIND_TO_SAMPLE, NodeConfig
from fusion_node.errors import ConfigError, FusionError
from fusion_node.host.threads import raise_thread_niceness
from fusion_node.logs.recorder import owned, queued_nbytes
from fusion_node.protocol import AudioChunk, Frame, JointState, Message
from fusion_node.view.common import speech_views

log = logging.getLogger(__name__)

# About a second of the default robot's messages and frames: older than that is not live.
DEFAULT_QUEUE_MESSAGES = 512
DEFAULT_QUEUE_BYTES = 64 << 20
_IDLE_WAIT_S = 0.01
_CLOSE_TIMEOUT_S = 5.0
_WATCH_CHECK_MESSAGES = 64  # asking each channel for sinks costs a call into the SDK
# foxglove-sdk logs here when a client's outbox is full and it drops for that client.
_SDK_OUTBOX_LOGGER = "foxglove.websocket.connected_client"


class _OutboxFullCounter(logging.Handler):
    """Counts the SDK's "outbox for client ... full" records: its only report of a drop."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "full" in record.getMessage():
            self.count += 1


def _stream_kinds(config: NodeConfig) -> dict[str, str]:
    """The streams of `config` by kind (frame, audio, joints, prediction), where the launch
    file says it without running a driver."""
    kinds = {d.stream: DRIVER_KIND_TO_SAMPLE[d.kind] for d in config.drivers
             if d.kind in DRIVER_KIND_TO_SAMPLE}
    kinds.update({s.name: s.kind for s in config.streams})
    kinds.update({e.topic: "prediction" for e in config.engines})
    return kinds


class DropOldestQueue:
    """A bounded queue of messages, safe between threads: putting never blocks; when it is
    full (messages or bytes), the oldest are dropped and counted by stream."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._items: deque[tuple[Message, int]] = deque()
        self._bytes = 0
        self._lock = threading.Lock()
        self.dropped: Counter[str] = Counter()

    def put(self, msg: Message) -> None:
        size = queued_nbytes(msg)
        with self._lock:
            while self._items and (len(self._items) >= self._max_messages
                                   or self._bytes + size > self._max_bytes):
                oldest, oldest_size = self._items.popleft()
                self._bytes -= oldest_size
                self.dropped[oldest.stream] += 1
            self._items.append((msg, size))
            self._bytes += size

    def pop(self) -> Message | None:
        with self._lock:
            if not self._items:
                return None
            msg, size = self._items.popleft()
            self._bytes -= size
            return msg

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def stats(self) -> tuple[int, dict[str, int]]:
        """How many messages wait, and the drops by stream."""
        with self._lock:
            return len(self._items), dict(self.dropped)


class FoxgloveServer:
    """A Foxglove WebSocket server fed from a bounded queue by its own thread (see the module
    docstring). Starts serving when made: a port in use or a missing foxglove-sdk is one
    ConfigError naming the address or the extra."""

    name = "foxglove"  # its entry in node.health

    def __init__(self, host: str, port: int, config: NodeConfig, *,
                 max_queue_messages: int = DEFAULT_QUEUE_MESSAGES,
                 max_queue_bytes: int = DEFAULT_QUEUE_BYTES) -> None:
        from fusion_node.view.foxglove import FoxgloveChannels, FoxgloveTopics, import_foxglove

        where = f"view.foxglove = \"{host}:{port}\""
        foxglove = import_foxglove(where)
        self.address = f"ws://{host if ':' not in host else f'[{host}]'}:{port}"
        # The live node stamps on this host's CLOCK_MONOTONIC (fusion_node.clock).
        self.wall_clock = measure_wall_clock()
        self._outbox_full = _OutboxFullCounter()
        sdk_logger = logging.getLogger(_SDK_OUTBOX_LOGGER)
        if sdk_logger.getEffectiveLevel() > logging.INFO:
            sdk_logger.setLevel(logging.INFO)  # else the SDK's record never reaches Python
        sdk_logger.addHandler(self._outbox_full)
        self._context = foxglove.Context()
        self._channels = FoxgloveChannels(self._context)
        self._topics = FoxgloveTopics(self._channels, speech_views(config),
                                      wall_clock=self.wall_clock)
        self._topics.declare(_stream_kinds(config),
                             actions=any(e.binding == "action" for e in config.engines))
        try:
            self._server = foxglove.start_server(name="fusion-node", host=host, port=port,
                                                 context=self._context)
        except Exception as exc:  # noqa: BLE001 - the SDK raises a bare RuntimeError
            sdk_logger.removeHandler(self._outbox_full)
            raise ConfigError(f"{where}: cannot serve Foxglove on {host}:{port} ({exc}); "
                              "is another node or server using the port?") from None
        self._queue = DropOldestQueue(max_queue_messages, max_queue_bytes)
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._watched = False
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run_blocking, name="foxglove", daemon=True)
        self.unwatched = 0
        self.converted = 0
        self.errors = 0
        self.last_error = ""
        self.priority = "default"
        self._thread.start()
        log.info("Foxglove: serving on %s (Foxglove app: Open connection → %s)", self.address,
                 self.address)

    def offer(self, msg: Message) -> bool:
        """Queue `msg` for the Foxglove clients without blocking; False if it is not queued
        (nobody watches its stream yet, or the server is closed)."""
        # Sensor samples are most of the work; the first of each stream makes the topics the
        # launch file does not imply (a ROS 2 driver's stream).
        if (not self._watched and isinstance(msg, (Frame, AudioChunk, JointState))
                and msg.stream in self._seen):
            with self._lock:
                self.unwatched += 1
            return False
        if self._stopping.is_set():
            return False
        with self._lock:
            self._seen.add(msg.stream)
        self._queue.put(owned(msg))  # type: ignore[arg-type]
        return True

    def stats(self) -> dict[str, Any]:
        queued, dropped = self._queue.stats()
        with self._lock:
            unwatched = self.unwatched
        return {"address": self.address, "watched": self._watched, "queued": queued,
                "converted": self.converted, "dropped": dropped, "unwatched": unwatched,
                "slow_client_events": self._outbox_full.count, "errors": self.errors,
                "last_error": self.last_error, "priority": self.priority,
                "wall_clock_uncertainty_us": self.wall_clock.uncertainty_ns / 1e3}

    def close(self) -> None:
        """Stop converting, unadvertise and stop serving; what is queued is not sent."""
        self._stopping.set()
        self._thread.join(_CLOSE_TIMEOUT_S)
        self._channels.close()
        self._server.stop()
        logging.getLogger(_SDK_OUTBOX_LOGGER).removeHandler(self._outbox_full)

    def _run_blocking(self) -> None:
        self.priority = raise_thread_niceness()
        since_check = 0
        while not self._stopping.is_set():
            msg = self._queue.pop()
            if msg is None or since_check >= _WATCH_CHECK_MESSAGES:
                self._watched = self._channels.watched()
                since_check = 0
            if msg is None:
                self._stopping.wait(_IDLE_WAIT_S)
                continue
            since_check += 1
            try:
                self._topics.message(msg)
                self.converted += 1
            except (FusionError, ValueError, KeyError, TypeError) as exc:
                # One bad message (a field of an unexpected type) costs its view, not the rest.
                self.errors += 1
                self.last_error = f"{msg.stream}: {type(exc).__name__}: {exc}"
                if self.errors == 1:
                    log.error("Foxglove: %s (counted in node.health foxglove.errors)",
                              self.last_error)
            # Hand the GIL to a thread waiting for it (the publisher at a deadline), as the
            # recorder does.
            time.sleep(0)
        self._queue.clear()
