"""Drivers as separate processes (`python -m drivers`) publishing over real ZeroMQ sockets."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import zmq

from drivers.sim.simulated import JOINT_NAMES
from fusion_node.clock import MonotonicClock
from fusion_node.protocol import AudioChunk, Frame, JointState
from fusion_node.transport import Subscriber

REPO = Path(__file__).resolve().parents[2]
EXIT_TIMEOUT_S = 10  # hang guard only


def start_driver(kind: str, stream: str, endpoint: str,
                 config: dict | None = None, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "drivers", "--kind", kind, "--stream", stream,
            "--endpoint", endpoint, *extra]
    if config is not None:
        args += ["--config", json.dumps(config)]
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> tuple[int, str]:
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=EXIT_TIMEOUT_S)
    return process.returncode, stderr


def receive(subscriber: Subscriber, count: int, kind: type) -> list:
    got = []
    for _ in range(100 * count):  # hang guard: generous number of 100 ms polls
        msg = subscriber.recv(timeout_ms=100)
        if isinstance(msg, kind):
            got.append(msg)
            if len(got) == count:
                return got
    raise AssertionError(f"received {len(got)} of {count} {kind.__name__} messages")


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def processes():
    started: list[subprocess.Popen] = []
    yield started
    for process in started:  # only those a failed test left running
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_simulated_sources_publish_until_sigterm(tmp_path, context, processes):
    clock = MonotonicClock()
    endpoints = {name: f"ipc://{tmp_path}/{name}.ipc" for name in ("cam", "mic", "arm")}
    processes += [start_driver("sim_camera", "camera.sim", endpoints["cam"]),
                  start_driver("sim_microphone", "audio.sim", endpoints["mic"], {"seed": 2}),
                  start_driver("sim_joints", "joints.sim", endpoints["arm"])]
    subscriber = Subscriber(context, endpoints.values(), clock)
    try:
        frames = receive(subscriber, 3, Frame)
        chunks = receive(subscriber, 20, AudioChunk)
        states = receive(subscriber, 20, JointState)
    finally:
        subscriber.close()
    for process in processes:
        assert stop(process) == (0, "")

    assert all(f.stream == "camera.sim" and f.image.shape == (480, 640, 3) for f in frames)
    assert all(f.t_receive_ns >= f.t_capture_ns for f in frames)
    indices = [c.sample_index for c in chunks]
    assert indices == list(range(indices[0], indices[0] + 160 * 20, 160))
    assert all(c.stream == "audio.sim" and c.samples.shape == (160, 1) for c in chunks)
    assert all(s.names == JOINT_NAMES for s in states)
    seqs = [s.seq for s in states]
    assert seqs == list(range(seqs[0], seqs[0] + 20))
    stamps = [s.t_capture_ns for s in states]
    assert np.all(np.diff(stamps) == 5_000_000)


def test_video_file_over_zeromq_and_sigint(tmp_path, context, processes):
    import cv2  # only this test needs a video file

    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (64, 48))
    for k in range(5):
        writer.write(np.full((48, 64, 3), (40 * k, 100, 200), np.uint8))
    writer.release()
    endpoint = f"ipc://{tmp_path}/cam.ipc"
    processes.append(start_driver("camera", "camera.file", endpoint,
                                  {"source": str(path), "loop": True}))
    subscriber = Subscriber(context, [endpoint], MonotonicClock())
    try:
        frames = receive(subscriber, 8, Frame)
    finally:
        subscriber.close()
    assert stop(processes[0], signal.SIGINT) == (0, "")

    assert all(f.encoding == "bgr8" and f.image.shape == (48, 64, 3) for f in frames)
    assert np.all(np.diff([f.t_capture_ns for f in frames]) == 40_000_000)
    for frame in frames:
        blue = frame.image[..., 0].mean()
        assert abs(blue - 40 * (frame.seq % 5)) < 6


def test_finite_source_exits_zero_at_its_end(tmp_path, processes):
    path = tmp_path / "short.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(np.zeros(1600, "<i2").tobytes())
    process = start_driver("wav", "audio.file", f"ipc://{tmp_path}/wav.ipc",
                           {"path": str(path), "realtime": False})
    processes.append(process)
    _, stderr = process.communicate(timeout=EXIT_TIMEOUT_S)
    assert (process.returncode, stderr) == (0, "")


@pytest.mark.parametrize("kind, config, message", [
    ("sim_camera", {"fsp": 30}, "unknown config key 'fsp'"),
    ("wav", {"path": "/nonexistent/a.wav"}, "a.wav"),
])
def test_bad_config_or_device_exits_one_with_one_line(tmp_path, processes, kind, config,
                                                      message):
    process = start_driver(kind, "sensor.x", f"ipc://{tmp_path}/x.ipc", config)
    processes.append(process)
    _, stderr = process.communicate(timeout=EXIT_TIMEOUT_S)
    assert process.returncode == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], stderr


def test_frames_inline_without_shared_memory(tmp_path, context, processes):
    """`--no-shared-memory`: a subscriber that cannot map shared memory gets whole frames."""
    endpoint = f"ipc://{tmp_path}/camera.ipc"
    processes.append(start_driver("sim_camera", "camera.front", endpoint, None,
                                  "--no-shared-memory"))
    subscriber = Subscriber(context, [endpoint], MonotonicClock(), shm=False)
    try:
        frames = receive(subscriber, 3, Frame)
    finally:
        subscriber.close()
    assert all(f.image.shape == (480, 640, 3) for f in frames)
    assert not subscriber.rejected
    code, _ = stop(processes[-1])
    assert code == 0
