"""OpenCVCamera on real video files written here with cv2.VideoWriter."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq

from drivers.camera import OpenCVCamera, OpenCVCameraConfig
from drivers.process import publish_driver
from fusion_node.bench.faults import fault_process_argv, free_tcp_port, wait_for_tcp_port
from fusion_node.clock import MonotonicClock
from fusion_node.errors import ConfigError, DriverError, EndOfStream
from fusion_node.protocol import Frame
from fusion_node.shm import ShmConfig, ShmWriter, in_shared_memory
from fusion_node.transport import Publisher, Subscriber
from tests.drivers.test_driver_process import receive

FPS = 25
PERIOD_NS = 1_000_000_000 // FPS
N_FRAMES = 12
WIDTH, HEIGHT = 96, 64


def frame_colour(k: int) -> tuple[int, int, int]:
    """BGR colour of frame k: distinct per channel so channel order is checked too."""
    return (20 * k % 250, 200 - 10 * k, 60)


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (WIDTH, HEIGHT))
    assert writer.isOpened()
    for k in range(N_FRAMES):
        writer.write(np.full((HEIGHT, WIDTH, 3), frame_colour(k), np.uint8))
    writer.release()
    return path


def assert_colour(image: np.ndarray, k: int) -> None:
    mean = image.reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(mean, frame_colour(k), atol=4)  # MJPG is lossy


async def read_all(camera: OpenCVCamera) -> list:
    frames = []
    while True:
        try:
            frames.append(await camera.recv())
        except EndOfStream:
            return frames


async def test_file_fast_reads_every_frame_with_file_times(video, stepping_clock):
    start_ns = stepping_clock.now_ns()
    camera = OpenCVCamera(OpenCVCameraConfig("camera.test", str(video), realtime=False),
                          stepping_clock)
    await camera.connect()
    frames = await read_all(camera)
    with pytest.raises(EndOfStream):  # stays ended
        await camera.recv()
    await camera.disconnect()

    assert len(frames) == N_FRAMES
    assert [f.seq for f in frames] == list(range(N_FRAMES))
    assert [f.t_capture_ns for f in frames] == [start_ns + k * PERIOD_NS
                                                for k in range(N_FRAMES)]
    for k, frame in enumerate(frames):
        assert frame.stream == "camera.test"
        assert frame.encoding == "bgr8"
        assert frame.image.shape == (HEIGHT, WIDTH, 3) and frame.image.dtype == np.uint8
        assert_colour(frame.image, k)
    # As fast as possible: the driver never waited on the clock.
    assert stepping_clock.now_ns() == start_ns


async def test_file_realtime_delivers_each_frame_at_its_time(video, stepping_clock):
    camera = OpenCVCamera(OpenCVCameraConfig("camera.test", str(video)), stepping_clock)
    await camera.connect()
    for _ in range(N_FRAMES):
        frame = await camera.recv()
        assert stepping_clock.now_ns() == frame.t_capture_ns
    await camera.disconnect()


async def test_file_realtime_on_monotonic_clock_never_early(video):
    clock = MonotonicClock()
    camera = OpenCVCamera(OpenCVCameraConfig("camera.test", str(video)), clock)
    await camera.connect()
    for _ in range(4):
        frame = await camera.recv()
        assert clock.now_ns() >= frame.t_capture_ns
    await camera.disconnect()


async def test_file_loop_continues_stamps_and_restarts_images(video, stepping_clock):
    start_ns = stepping_clock.now_ns()
    camera = OpenCVCamera(OpenCVCameraConfig("camera.test", str(video), realtime=False,
                                             loop=True), stepping_clock)
    await camera.connect()
    frames = [await camera.recv() for _ in range(2 * N_FRAMES + 3)]
    await camera.disconnect()
    assert [f.t_capture_ns - start_ns for f in frames] == [k * PERIOD_NS
                                                           for k in range(len(frames))]
    assert [f.seq for f in frames] == list(range(len(frames)))
    for k, frame in enumerate(frames):
        assert_colour(frame.image, k % N_FRAMES)


async def test_missing_file_names_it(tmp_path, stepping_clock):
    path = tmp_path / "absent.avi"
    camera = OpenCVCamera(OpenCVCameraConfig("camera.test", str(path)), stepping_clock)
    with pytest.raises(DriverError, match=r"absent\.avi"):
        await camera.connect()
    await camera.disconnect()  # safe after a failed connect


async def test_missing_device_names_it(stepping_clock):
    camera = OpenCVCamera(OpenCVCameraConfig("camera.test", 63), stepping_clock)
    with pytest.raises(DriverError, match=r"camera 63 .*cannot open"):
        await camera.connect()


async def test_recv_before_connect_is_an_error(video, stepping_clock):
    camera = OpenCVCamera(OpenCVCameraConfig("camera.test", str(video)), stepping_clock)
    with pytest.raises(DriverError, match="not connected"):
        await camera.recv()


@pytest.mark.parametrize("kwargs, key", [
    ({"source": "clip.avi", "width": 640}, "width"),
    ({"source": "clip.avi", "delay_ms": 5.0}, "delay_ms"),
    ({"source": 0, "loop": True}, "loop"),
    ({"source": 0, "fps": 0.0}, "fps"),
    ({"source": "/dev/video0", "delay_ms": -1.0}, "delay_ms"),
])
def test_config_rejects_inapplicable_or_bad_values(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        OpenCVCameraConfig("camera.test", **kwargs)


# -- decoding straight into the publisher's shared-memory slots --------------------------------

LARGE_WIDTH, LARGE_HEIGHT = 320, 240  # 230 KB: above the shared-memory threshold


@pytest.fixture(scope="module")
def large_video(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    """A textured clip, and its frames as OpenCV decodes them: the bytes to expect."""
    path = tmp_path_factory.mktemp("video") / "large.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS,
                             (LARGE_WIDTH, LARGE_HEIGHT))
    rng = np.random.default_rng(3)
    for _ in range(N_FRAMES):
        blocks = rng.integers(0, 256, (LARGE_HEIGHT // 8, LARGE_WIDTH // 8, 3), np.uint8)
        writer.write(np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1))
    writer.release()
    capture = cv2.VideoCapture(str(path))
    decoded = [image for ok, image in iter(capture.read, (False, None)) if ok]
    capture.release()
    assert len(decoded) == N_FRAMES
    return path, decoded


def start_camera_server(port: int, fps: float) -> subprocess.Popen:
    """A network camera (HTTP MJPEG) in its own process."""
    return subprocess.Popen(fault_process_argv("camera-server", "--port", str(port),
                                               "--fps", str(fps)), stdout=subprocess.DEVNULL)


@pytest.fixture
def publisher_and_subscriber(tmp_path):
    context = zmq.Context()
    endpoint = f"ipc://{tmp_path}/camera.ipc"
    publisher = Publisher(context, endpoint)
    subscriber = Subscriber(context, [endpoint], MonotonicClock())
    yield publisher, subscriber
    subscriber.close()
    publisher.close()
    context.destroy(linger=0)


async def test_file_frames_decode_into_loaned_slots_and_arrive_bit_exact(
        large_video, publisher_and_subscriber):
    path, decoded = large_video
    publisher, subscriber = publisher_and_subscriber
    camera = OpenCVCamera(OpenCVCameraConfig("camera.large", str(path), loop=True),
                          MonotonicClock())
    task = asyncio.create_task(publish_driver(camera, publisher))
    try:
        received = await asyncio.to_thread(receive, subscriber, 2 * N_FRAMES, Frame)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for frame in received:
        assert in_shared_memory(frame.image)
        np.testing.assert_array_equal(frame.image, decoded[frame.seq % N_FRAMES])
    writer = publisher.shm
    assert writer is not None and writer.sent == writer.loaned >= 2 * N_FRAMES
    # Every frame, the first one too (one more if the cancel came after its decode).
    assert camera.decoded_in_place - writer.loaned in (0, 1)


async def test_live_frames_dropped_before_sending_give_their_slots_back(
        publisher_and_subscriber):
    """A slow sender drops the oldest queued frames: each gives its slot back, or a camera
    would exhaust its ring within seconds and fall back to copies."""
    publisher, _ = publisher_and_subscriber
    # Room for the 8 frames sent (leased 3 s) and the few in flight, not for the dropped.
    config = ShmConfig(slots=16)
    publisher.shm = ShmWriter(config)
    port = free_tcp_port()
    server = start_camera_server(port, fps=50)
    try:
        await asyncio.to_thread(wait_for_tcp_port, port)
        camera = OpenCVCamera(OpenCVCameraConfig(
            "camera.live", f"http://127.0.0.1:{port}/camera.mjpg"), MonotonicClock())
        camera.use_loans(publisher.loan)
        await camera.connect()
        try:
            for _ in range(8):  # one frame sent per 0.3 s, up to 15 captured meanwhile
                await asyncio.sleep(0.3)
                publisher.send(await camera.recv())
        finally:
            await camera.disconnect()
    finally:
        server.terminate()
        server.wait(10)
    writer = publisher.shm
    assert camera.dropped_frames > 2 * config.slots
    assert camera.decoded_in_place > 3 * config.slots  # many more loans than slots...
    assert writer.loaned == 8 and writer.fallbacks == 0  # ...and the ring never ran out
