"""Simulated sources: pacing and stamps on the clock, and a mouth that moves with the voice."""

from __future__ import annotations

import numpy as np
import zmq

from drivers.sim.simulated import (
    JOINT_NAMES,
    MOUTH_ROI,
    SimulatedCamera,
    SimulatedCameraConfig,
    SimulatedJoints,
    SimulatedJointsConfig,
    SimulatedMicrophone,
    SimulatedMicrophoneConfig,
    mouth_opening,
    speaking,
)
from fusion_node.shm import in_shared_memory
from fusion_node.transport import Publisher

NS_PER_S = 1_000_000_000


async def test_camera_paced_stamped_and_mouth_follows_script(stepping_clock):
    t0 = stepping_clock.now_ns()
    camera = SimulatedCamera(SimulatedCameraConfig("camera.sim"), stepping_clock)
    await camera.connect()
    frames = []
    for _ in range(75):  # 2.5 s: speech and silence
        frame = await camera.recv()
        assert stepping_clock.now_ns() == frame.t_capture_ns  # delivered at capture
        frames.append(frame)
    await camera.disconnect()

    assert [f.t_capture_ns for f in frames] == [t0 + round(k * NS_PER_S / 30)
                                                for k in range(75)]
    assert [f.seq for f in frames] == list(range(75))
    first = frames[0].image
    assert first.shape == (480, 640, 3) and first.dtype == np.uint8
    assert all(f.encoding == "rgb8" for f in frames)

    x, y, w, h = MOUTH_ROI
    # Lips move up to 30 ms around the sound (coarticulation): judge silence away from it.
    silent = [f for f in frames
              if not any(speaking(f.t_capture_ns + d) for d in (-50_000_000, 0, 50_000_000))]
    open_ = [f for f in frames if mouth_opening(f.t_capture_ns) > 0.5]
    assert silent and open_
    for frame in frames:  # only the mouth region ever changes
        rows, cols = np.nonzero(np.any(frame.image != first, axis=2))
        assert np.all((rows >= y) & (rows < y + h) & (cols >= x) & (cols < x + w))
    closed_roi = silent[0].image[y:y + h, x:x + w]
    for frame in silent:
        np.testing.assert_array_equal(frame.image[y:y + h, x:x + w], closed_roi)

    def dark_pixels(image: np.ndarray) -> int:
        return int((image[y:y + h, x:x + w].sum(axis=2) < 100).sum())

    assert min(dark_pixels(f.image) for f in open_) > 10 * max(1, dark_pixels(closed_roi))


async def test_microphone_chunks_and_voice_during_speech(stepping_clock):
    t0 = stepping_clock.now_ns()
    mic = SimulatedMicrophone(SimulatedMicrophoneConfig("audio.sim", seed=1), stepping_clock)
    await mic.connect()
    chunks = []
    for _ in range(250):  # 2.5 s
        chunk = await mic.recv()
        assert stepping_clock.now_ns() == chunk.t_capture_ns + chunk.duration_ns
        chunks.append(chunk)
    await mic.disconnect()

    assert [c.sample_index for c in chunks] == [160 * k for k in range(250)]
    assert [c.t_capture_ns for c in chunks] == [t0 + k * 10_000_000 for k in range(250)]
    assert all(c.samples.shape == (160, 1) and c.samples.dtype == np.int16 for c in chunks)
    assert all(c.sample_rate == 16000 for c in chunks)

    def rms(chunk) -> float:
        return float(np.sqrt(np.mean(chunk.samples.astype(np.float64) ** 2)))

    voiced = [rms(c) for c in chunks if mouth_opening(c.t_capture_ns + 5_000_000) > 0.5]
    silent = [rms(c) for c in chunks
              if not speaking(c.t_capture_ns) and not speaking(c.t_capture_ns + 9_999_999)]
    assert voiced and silent
    assert min(voiced) > 20 * max(silent)
    assert 0 < max(silent) < 100  # low noise, not digital silence


async def test_microphone_seed_makes_it_deterministic(stepping_clock):
    async def first_chunks() -> np.ndarray:
        clock = type(stepping_clock)(stepping_clock.now_ns())  # a fresh clock at the same time
        mic = SimulatedMicrophone(SimulatedMicrophoneConfig("audio.sim", seed=5), clock)
        await mic.connect()
        chunks = [await mic.recv() for _ in range(5)]
        await mic.disconnect()
        return np.concatenate([c.samples for c in chunks])

    np.testing.assert_array_equal(await first_chunks(), await first_chunks())


async def test_joints_rate_names_and_consistent_velocity(stepping_clock):
    t0 = stepping_clock.now_ns()
    joints = SimulatedJoints(SimulatedJointsConfig("joints.sim"), stepping_clock)
    await joints.connect()
    states = [await joints.recv() for _ in range(400)]  # 2 s at 200 Hz
    await joints.disconnect()

    assert [s.t_capture_ns for s in states] == [t0 + k * 5_000_000 for k in range(400)]
    assert [s.seq for s in states] == list(range(400))
    assert all(s.names == JOINT_NAMES for s in states)
    position = np.array([s.position for s in states])
    velocity = np.array([s.velocity for s in states])
    # Central differences of position match the reported velocity.
    numeric = (position[2:] - position[:-2]) / 0.010
    np.testing.assert_allclose(numeric, velocity[1:-1], atol=1e-3)
    assert np.all(np.ptp(position, axis=0) > 0.1)  # every joint actually moves


async def test_camera_renders_into_the_publishers_shared_memory_slots(tmp_path, stepping_clock):
    context = zmq.Context()
    publisher = Publisher(context, f"ipc://{tmp_path}/camera.ipc")
    try:
        camera = SimulatedCamera(SimulatedCameraConfig("camera.sim"), stepping_clock)
        camera.use_loans(publisher.loan)
        reference = SimulatedCamera(SimulatedCameraConfig("camera.sim"), stepping_clock)
        await camera.connect()
        for _ in range(5):
            frame = await camera.recv()
            assert in_shared_memory(frame.image)
            np.testing.assert_array_equal(frame.image, reference.render(frame.t_capture_ns))
            publisher.send(frame)
        assert publisher.shm is not None and publisher.shm.loaned == publisher.shm.sent == 5
    finally:
        publisher.close()
        context.destroy(linger=0)
