"""The simulated arm driver: joint states and scene frames in capture order, and a real
closed loop: action chunks published on a ZeroMQ socket move the arm."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import zmq

from drivers.sim.arm import HOME, JOINT_NAMES, RENDER_HEIGHT, RENDER_WIDTH
from drivers.sim.arm_driver import SUBSTEP_NS, SimulatedArm, SimulatedArmConfig
from fusion_node.clock import MonotonicClock
from fusion_node.errors import ConfigError
from fusion_node.protocol import Frame, JointState, Prediction
from fusion_node.transport import Publisher

MS = 1_000_000


async def test_states_and_frames_interleave_in_capture_order(stepping_clock):
    arm = SimulatedArm(SimulatedArmConfig("joints.arm"), stepping_clock)
    await arm.connect()
    t0 = stepping_clock.now_ns()
    samples = [await arm.recv() for _ in range(230)]
    await arm.disconnect()
    states = [s for s in samples if isinstance(s, JointState)]
    frames = [s for s in samples if isinstance(s, Frame)]
    stamps = [s.t_capture_ns for s in samples]
    assert stamps == sorted(stamps)
    assert [s.t_capture_ns - t0 for s in states] == [k * SUBSTEP_NS for k in range(len(states))]
    assert [f.t_capture_ns - t0 for f in frames] == [k * 40 * MS for k in range(len(frames))]
    assert all(s.names == JOINT_NAMES for s in states) and all(f.stream == "camera.scene"
                                                                for f in frames)
    assert frames[0].image.shape == (RENDER_HEIGHT, RENDER_WIDTH, 3)
    # No action source: the arm holds its home pose.
    np.testing.assert_allclose(states[-1].position, HOME)
    np.testing.assert_allclose(states[-1].velocity, 0)


def test_config_is_checked():
    with pytest.raises(ConfigError, match="camera_fps"):
        SimulatedArmConfig("joints.arm", camera_fps=0)
    with pytest.raises(ConfigError, match="another name"):
        SimulatedArmConfig("joints.arm", camera_stream="joints.arm")


async def test_action_chunks_on_a_socket_move_the_arm(tmp_path):
    """A control loop in the driver follows chunks from a real publisher."""
    clock = MonotonicClock()
    context = zmq.Context()
    publisher = Publisher(context, f"ipc://{tmp_path}/pred.ipc")
    target = np.array([1.2, 0.6, -0.4], np.float32)
    arm = SimulatedArm(SimulatedArmConfig("joints.arm", actions=publisher.endpoint), clock)
    await arm.connect()
    seq = 0
    last = None
    try:
        end_ns = clock.now_ns() + 2_500 * MS
        next_chunk_ns = clock.now_ns()
        while clock.now_ns() < end_ns:
            sample = await arm.recv()
            if isinstance(sample, JointState):
                last = sample
            now = clock.now_ns()
            if now >= next_chunk_ns:
                steps = now + 20 * MS * np.arange(1, 21, dtype=np.int64)
                publisher.send(Prediction(
                    "pred.action", seq, now, now + 30 * MS, "action", "h", {"joints.arm": True},
                    {}, {"actions": np.tile(target, (20, 1)), "step_times_ns": steps}, {}))
                seq += 1
                next_chunk_ns = now + 40 * MS
            await asyncio.sleep(0)
    finally:
        await arm.disconnect()
        publisher.close()
        context.destroy(linger=0)
    assert arm.chunks_received > 10 and arm.bad_chunks == 0
    assert last is not None
    np.testing.assert_allclose(last.position, target, atol=0.02)
