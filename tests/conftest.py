"""What many test files share: a real node on an ephemeral port, and a collector of all it
publishes (import them: `from tests.conftest import running`)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import AsyncIterator

import zmq

from fusion_node.clock import MonotonicClock
from fusion_node.node import Node
from fusion_node.transport import Subscriber

ENGINES = """
[[engines]]
name = "speech"
binding = "speech"
model = "speech"
topic = "pred.speech"
rate_hz = 30
latency_ms = 40
align_delay_ms = 16
inputs = { audio = "audio.mic0", video = "camera.front" }
params = { mouth_roi = [256, 272, 128, 96] }

[[engines]]
name = "action"
binding = "action"
model = "action"
topic = "pred.action"
rate_hz = 25
latency_ms = 30
align_delay_ms = 8
inputs = { image = "camera.front", joints = "joints.arm", command = "pred.speech" }
"""


class Collector:
    """Receives everything the node publishes, on a thread, until stopped."""

    def __init__(self, endpoint: str) -> None:
        self.messages: list = []
        self._context = zmq.Context()
        self._subscriber = Subscriber(self._context, [endpoint], MonotonicClock())
        self._running = True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self._running:
            msg = self._subscriber.recv(timeout_ms=50)
            if msg is not None:
                self.messages.append(msg)

    def close(self) -> None:
        self._running = False
        self._thread.join()
        self._subscriber.close()
        self._context.term()

    def on(self, topic: str) -> list:
        return [m for m in self.messages if m.stream == topic]


@contextlib.asynccontextmanager
async def running(config) -> AsyncIterator[tuple[Node, Collector]]:
    """A node on an ephemeral port and a collector of all it publishes, stopped on exit."""
    node = Node(dataclasses.replace(config, pub="tcp://127.0.0.1:*"))
    stop = asyncio.Event()
    task = asyncio.create_task(node.run(stop))
    await asyncio.wait_for(node.ready.wait(), 30)
    collector = Collector(node.pub_endpoint)
    try:
        yield node, collector
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        collector.close()


async def run_node(config, seconds: float, during=None) -> tuple[Node, Collector]:
    async with running(config) as (node, collector):
        if during is not None:
            await asyncio.to_thread(during, seconds)
        else:
            await asyncio.sleep(seconds)
    return node, collector
