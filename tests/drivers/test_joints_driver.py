"""ZmqJointSubscriber against a real ZeroMQ publisher playing the robot controller."""

from __future__ import annotations

import asyncio
import threading
from typing import Self

import numpy as np
import pytest
import zmq

from drivers.joints import ZmqJointSubscriber, ZmqJointSubscriberConfig
from fusion_node.clock import MonotonicClock
from fusion_node.errors import DriverError, EndOfStream
from fusion_node.protocol import Frame, JointState
from fusion_node.transport import Publisher

NAMES = ("j1", "j2")
REJECTS = ("wrong_kind", "names_changed", "not_monotonic")


@pytest.fixture
def endpoint(tmp_path) -> str:
    return f"ipc://{tmp_path}/controller.ipc"


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)  # closes sockets a failed test left open


def controller_state(k: int, names: tuple[str, ...] = NAMES) -> JointState:
    position = np.arange(len(names)) + 0.1 * k
    return JointState("joints.ctrl", k, 1_000_000 + 5_000 * k, names, position,
                      np.ones(len(names)), np.zeros(len(names)))


class Controller:
    """Publishes joint states with rising stamps until stopped; once `misbehave` is set, each
    is followed by a message of another kind, a state with other joint names and a repeat."""

    def __init__(self, context: zmq.Context, endpoint: str) -> None:
        self._publisher = Publisher(context, endpoint)
        self._stop = threading.Event()
        self.misbehave = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        k = 1
        while not self._stop.is_set():
            self._publisher.send(controller_state(k))
            if self.misbehave.is_set():
                self._publisher.send(Frame("camera.x", 0, 0, np.zeros((2, 2, 3), np.uint8)))
                self._publisher.send(controller_state(k + 1, names=("other",)))
                self._publisher.send(controller_state(k))
            k += 1
            self._stop.wait(0.001)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._publisher.close()


async def test_reemits_states_keeps_stamps_and_counts_rejects(context, endpoint):
    driver = ZmqJointSubscriber(ZmqJointSubscriberConfig("joints.arm", endpoint),
                                MonotonicClock(), context)
    await driver.connect()
    with Controller(context, endpoint) as controller:
        # The first state fixes the joint names; only then does the controller misbehave.
        states = [await driver.recv()]
        controller.misbehave.set()
        # A loaded machine may drop some of the bad messages at the publisher's high-water
        # mark, so read until each kind of reject has been seen often enough.
        while min(driver.rejected[k] for k in REJECTS) < 8 and len(states) < 5000:
            states.append(await driver.recv())
    await driver.disconnect()

    assert [s.seq for s in states] == list(range(len(states)))
    ks = [(s.t_capture_ns - 1_000_000) // 5_000 for s in states]
    assert ks == sorted(set(ks))  # rising stamps, none repeated
    for state, k in zip(states, ks, strict=True):
        sent = controller_state(k)
        assert state.stream == "joints.arm" and state.names == NAMES
        assert state.t_capture_ns == sent.t_capture_ns
        np.testing.assert_array_equal(state.position, sent.position)
        np.testing.assert_array_equal(state.velocity, sent.velocity)
    assert min(driver.rejected[k] for k in REJECTS) >= 8, driver.rejected


async def test_silence_is_a_fault_naming_endpoint(context, endpoint):
    driver = ZmqJointSubscriber(ZmqJointSubscriberConfig("joints.arm", endpoint, timeout_ms=150),
                                MonotonicClock(), context)
    await driver.connect()
    with pytest.raises(DriverError, match=r"controller\.ipc.*150"):
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
