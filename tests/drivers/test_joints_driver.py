"""ZmqJointSubscriber against a real ZeroMQ publisher playing the robot controller."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import zmq

from drivers.joints import ZmqJointSubscriber, ZmqJointSubscriberConfig
from fusion_node.clock import MonotonicClock
from fusion_node.errors import DriverError, EndOfStream
from fusion_node.protocol import Frame, JointState
from fusion_node.transport import Publisher

NAMES = ("j1", "j2")


@pytest.fixture
def endpoint(tmp_path) -> str:
    return f"ipc://{tmp_path}/controller.ipc"


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.term()


def controller_state(k: int) -> JointState:
    position = np.array([0.1 * k, -0.1 * k])
    return JointState("joints.ctrl", k, 1_000_000 + 5_000 * k, NAMES, position,
                      np.array([1.0, -1.0]), np.zeros(2))


class Controller:
    """Publishes a scripted sequence in a loop until stopped (a PUB drops messages sent
    before the subscriber has joined, so the sequence repeats until it is seen)."""

    def __init__(self, context: zmq.Context, endpoint: str, script: list) -> None:
        self._publisher = Publisher(context, endpoint)
        self._script = script
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for msg in self._script:
                self._publisher.send(msg)
                self._stop.wait(0.001)

    def __enter__(self) -> Controller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._publisher.close()


async def test_reemits_states_keeps_stamps_and_counts_rejects(context, endpoint):
    good = [controller_state(k) for k in range(1, 4)]
    wrong_kind = Frame("camera.x", 0, 0, np.zeros((2, 2, 3), np.uint8))
    renamed = JointState("joints.ctrl", 9, 2_000_000_000, ("other",), np.zeros(1), np.zeros(1),
                         np.zeros(1))
    script = [*good, wrong_kind, renamed]
    driver = ZmqJointSubscriber(ZmqJointSubscriberConfig("joints.arm", endpoint), MonotonicClock(),
                                context)
    await driver.connect()
    with Controller(context, endpoint, script):
        first = await driver.recv()
        # Wherever the subscription joined, the next good state follows in script order.
        states = [first] + [await driver.recv() for _ in range(5)]
    await driver.disconnect()

    assert [s.seq for s in states] == list(range(6))
    for state in states:
        assert state.stream == "joints.arm" and state.names == NAMES
        k = (state.t_capture_ns - 1_000_000) // 5_000
        np.testing.assert_array_equal(state.position, controller_state(k).position)
    # The script repeats with the same stamps: a replayed stamp is refused, not re-emitted.
    assert len({s.t_capture_ns for s in states}) == 3
    stamps = [s.t_capture_ns for s in states[:3]]
    assert stamps == sorted(stamps)
    rejected = driver.rejected
    assert rejected["wrong_kind"] >= 1 and rejected["names_changed"] >= 1
    assert rejected["not_monotonic"] >= 1


async def test_silence_is_a_fault_naming_endpoint(context, endpoint):
    driver = ZmqJointSubscriber(ZmqJointSubscriberConfig("joints.arm", endpoint, timeout_ms=150),
                                MonotonicClock(), context)
    await driver.connect()
    with pytest.raises(DriverError, match="controller.ipc.*150"):
        await driver.recv()
    await driver.disconnect()


async def test_disconnect_stops_a_pending_recv_promptly(context, endpoint):
    driver = ZmqJointSubscriber(ZmqJointSubscriberConfig("joints.arm", endpoint), MonotonicClock(),
                                context)
    await driver.connect()
    pending = asyncio.create_task(driver.recv())
    await asyncio.sleep(0.05)
    async with asyncio.timeout(1.0):  # hang guard, far above one poll interval
        await driver.disconnect()
        with pytest.raises(EndOfStream):
            await pending
