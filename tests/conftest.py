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
from fusion_node.protocol import Prediction
from fusion_node.scheduling import TickGrid
from fusion_node.transport import Subscriber

# The simulated sensors' [[drivers]] tables, for launch files written by tests.
SIM_CAMERA = """
[[drivers]]
kind = "sim_camera"
stream = "camera.front"
"""
SIM_MICROPHONE = """
[[drivers]]
kind = "sim_microphone"
stream = "audio.mic0"
"""
SIM_JOINTS = """
[[drivers]]
kind = "sim_joints"
stream = "joints.arm"
"""
SIM_MICROPHONE_AND_JOINTS = SIM_MICROPHONE + SIM_JOINTS
SIM_SENSORS = SIM_CAMERA + SIM_MICROPHONE_AND_JOINTS


def external_stream(name: str, kind: str, endpoint: str) -> str:
    """Launch-file tables for a stream the node subscribes to at `endpoint`: a publisher
    outside the node (a fault process, a robot controller) stands in for its driver."""
    return f'[node]\nconnect = ["{endpoint}"]\n\n[[streams]]\nname = "{name}"\nkind = "{kind}"\n'

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


SPEECH_GRID = TickGrid(30)
ACTION_GRID = TickGrid(25)


def grid_indices(predictions: list[Prediction], grid: TickGrid) -> list[int]:
    return [grid.first_at_or_after(p.t_ref_ns) for p in predictions]


def lost_ticks(predictions: list[Prediction], grid: TickGrid) -> list[int]:
    """Ticks of the grid, between the first and last prediction, with no prediction."""
    ticks = grid_indices(predictions, grid)
    return sorted(set(range(ticks[0], ticks[-1] + 1)) - set(ticks))


def assert_ticking(predictions: list[Prediction], grid: TickGrid, engine: dict) -> None:
    """Predictions tick after tick, seq +1 each, delivered to the subscriber without loss.

    On a busy 2-core machine (CI, or training beside the tests) a sensor process can be
    starved past a window's cut, so some ticks may go unpublished: each must then be
    counted on node.health (missing input, error or skipped), never lost silently."""
    seqs = [p.seq for p in predictions]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "the subscriber lost some"
    lost = lost_ticks(predictions, grid)
    accounted = engine["missing_required"] + engine["errors"] + engine["skipped_ticks"]
    assert len(lost) <= accounted, f"{len(lost)} ticks lost, {accounted} counted: {engine}"


# A camera whose source does not exist: its driver process fails at every start.
ALWAYS_CRASHING = """
[node]
driver_max_restarts = 2
driver_restart_backoff_ms = 50

[[drivers]]
kind = "camera"
stream = "camera.front"
config = { source = "/nonexistent/camera.mp4" }
""" + SIM_MICROPHONE_AND_JOINTS + ENGINES
