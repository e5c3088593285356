"""Calibration files and tools: camera intrinsics from rendered checkerboards, the
audio-video offset from synthesised claps, and the node applying calibrated delays."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq

from fusion_node.calibration import (
    Calibration,
    estimate_av_offset,
    load_calibration,
    load_camera_info,
)
from fusion_node.cli import main
from fusion_node.config import parse_config
from fusion_node.errors import CalibrationError
from fusion_node.logs.mcap_format import LogWriter
from fusion_node.node import Node
from fusion_node.protocol import AudioChunk, Frame, JointState
from fusion_node.transport import Publisher

REPO = Path(__file__).resolve().parents[1]
SIZE = (640, 480)
K_TRUE = np.array([[820.0, 0.0, 330.0], [0.0, 810.0, 245.0], [0.0, 0.0, 1.0]])
DIST_TRUE = np.array([-0.12, 0.05, 0.0, 0.0, 0.0])
BOARD = (9, 6)  # inner corners
SQUARE_MM = 25.0


def render_board(rvec: np.ndarray, tvec: np.ndarray) -> np.ndarray:
    """The image a camera with K_TRUE, DIST_TRUE sees of the board at (rvec, tvec): the
    pinhole view of the board texture, then the lens distortion, rendered 4x supersampled
    and averaged down so edges are anti-aliased as on a real sensor."""
    scale = 4
    big = (SIZE[0] * scale, SIZE[1] * scale)
    # Pixel centres: pixel x of the final image covers big pixels 4x .. 4x+3.
    to_big = np.array([[scale, 0, (scale - 1) / 2], [0, scale, (scale - 1) / 2], [0, 0, 1]])
    k_big = to_big @ K_TRUE
    per_square = 100  # texture pixels per square
    cols, rows = BOARD[0] + 5, BOARD[1] + 5  # squares, with a white margin of 1.5 squares
    v, u = np.mgrid[0:rows * per_square, 0:cols * per_square]
    col, row = u // per_square - 2, v // per_square - 2
    texture = np.full(u.shape, 110, np.uint8)
    texture[(col >= -2) & (col <= BOARD[0]) & (row >= -2) & (row <= BOARD[1])] = 235
    on_board = (col >= -1) & (col <= BOARD[0] - 1) & (row >= -1) & (row <= BOARD[1] - 1)
    texture[on_board & ((col + row) % 2 == 0)] = 20
    # texture pixel -> board mm (pixel centres) -> ideal image
    mm = SQUARE_MM / per_square
    texture_to_board = np.array([[mm, 0, -2 * SQUARE_MM + mm / 2],
                                 [0, mm, -2 * SQUARE_MM + mm / 2], [0, 0, 1]])
    rotation, _ = cv2.Rodrigues(rvec)
    plane = np.column_stack([rotation[:, 0], rotation[:, 1], tvec.ravel()])
    ideal = cv2.warpPerspective(texture, k_big @ plane @ texture_to_board, big,
                                flags=cv2.INTER_AREA, borderValue=110)
    # Where each distorted pixel lies in the ideal image: exact on a coarse grid, linearly
    # interpolated between (the map is smooth). Grid point i sits where cv2.resize puts it.
    step = 8
    ys, xs = np.mgrid[0:big[1] // step, 0:big[0] // step] * step + (step - 1) / 2
    grid = np.stack([xs, ys], -1).reshape(-1, 1, 2).astype(np.float64)
    ideal_at = cv2.undistortPoints(grid, k_big, DIST_TRUE, None, None, k_big,
                                   (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 30, 1e-12))
    ideal_at = ideal_at.reshape(xs.shape + (2,)).astype(np.float32)
    map_x = cv2.resize(ideal_at[..., 0], big, interpolation=cv2.INTER_LINEAR)
    map_y = cv2.resize(ideal_at[..., 1], big, interpolation=cv2.INTER_LINEAR)
    distorted = cv2.remap(ideal, map_x, map_y, cv2.INTER_LINEAR, borderValue=110)
    return cv2.resize(distorted, SIZE, interpolation=cv2.INTER_AREA)


def board_poses() -> list[tuple[np.ndarray, np.ndarray]]:
    centre = np.array([4 * SQUARE_MM, 2.5 * SQUARE_MM, 0.0])
    poses = []
    for rx, ry, rz, distance, dx, dy in [(0.0, 0.0, 0.0, 420, 0, 0), (0.35, 0.0, 0.1, 450, -40, 20),
                                         (-0.35, 0.1, -0.1, 430, 30, -20),
                                         (0.0, 0.4, 0.05, 460, 50, 10),
                                         (0.1, -0.4, 0.0, 440, -50, -10),
                                         (0.3, 0.3, 0.2, 500, 0, 40), (-0.3, -0.3, -0.2, 480, 20, -40),
                                         (0.2, -0.25, 0.3, 380, -20, 0)]:
        rvec = np.array([rx, ry, rz])
        rotation, _ = cv2.Rodrigues(rvec)
        # Board centre placed at (dx, dy, distance) in the camera frame.
        tvec = np.array([dx, dy, distance], float) - rotation @ centre
        poses.append((rvec, tvec))
    return poses


@pytest.fixture(scope="module")
def board_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("board")
    for index, (rvec, tvec) in enumerate(board_poses()):
        cv2.imwrite(str(folder / f"view{index:02d}.png"), render_board(rvec, tvec))
    cv2.imwrite(str(folder / "blank.png"), np.full((SIZE[1], SIZE[0]), 128, np.uint8))
    return folder


def test_camera_intrinsics_from_rendered_checkerboards(board_images, tmp_path, capsys):
    out = tmp_path / "camera.front.yaml"
    assert main(["calibrate", "camera", str(board_images), "--board", "9x6",
                 "--square-mm", "25", "--name", "camera.front", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    errors = {key: report[key] / truth - 1 for key, truth in
              (("fx", 820.0), ("fy", 810.0), ("cx", 330.0), ("cy", 245.0))}
    print("camera relative errors:", {k: f"{v:+.4%}" for k, v in errors.items()},
          "distortion:", report["distortion"][:2], "rms px:", report["reprojection_error_px"])
    assert all(abs(e) < 0.01 for e in errors.values()), errors
    assert abs(report["distortion"][0] - DIST_TRUE[0]) < 0.01
    assert abs(report["distortion"][1] - DIST_TRUE[1]) < 0.03
    assert report["reprojection_error_px"] < 0.5
    assert report["failed_detection"] == [str(board_images / "blank.png")]
    assert report["views_used"] == len(board_poses())
    # OpenCV's own reader and the camera_info loader both read the written file.
    storage = cv2.FileStorage(str(out), cv2.FILE_STORAGE_READ)
    data = storage.getNode("camera_matrix").getNode("data")
    assert [data.at(i).real() for i in (0, 2, 4, 5)] == pytest.approx(
        [report["fx"], report["cx"], report["fy"], report["cy"]])
    assert storage.getNode("image_width").real() == 640
    storage.release()
    info = load_camera_info(out)
    assert info.camera_name == "camera.front" and (info.width, info.height) == SIZE
    assert info.fx == pytest.approx(report["fx"]) and len(info.projection) == 12


@pytest.mark.parametrize("make, message", [
    (lambda d: (d / "broken.png").write_bytes(b"not a png"), "cannot read image"),
    (lambda d: cv2.imwrite(str(d / "blank.png"), np.zeros((48, 64), np.uint8)),
     "board 9x6 found in 0 of 1 views"),
    (lambda d: None, "no images found"),
])
def test_camera_bad_input_is_one_clear_error(tmp_path, capsys, make, message):
    make(tmp_path)
    assert main(["calibrate", "camera", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_board_argument(tmp_path, capsys):
    assert main(["calibrate", "camera", str(tmp_path), "--board", "9by6"]) == 1
    assert "board '9by6' must be COLSxROWS" in capsys.readouterr().err


# -- audio-video offset ---------------------------------------------------------------------

FPS = 25
RATE = 16_000
# Clap times in no phase with either frame grid: a frame exposed while the flash began is
# partly lit.
CLAPS_NS = (1_013_000_000, 2_227_000_000, 3_641_000_000)
FLASH_NS = 80_000_000
T0_NS = 5_000_000_000_000  # monotonic stamps far from zero, as on a robot


def write_clap_log(path: Path, offset_ms: float, audio: bool = True, video: bool = True,
                   seed: int = 0, fps: float = FPS, claps: tuple[int, ...] = CLAPS_NS) -> None:
    """4.5 s of a camera at `fps` and a 16 kHz microphone; at each clap an 80 ms flash and a
    click heard `offset_ms` later than seen (audio stamped late when > 0). The camera exposes
    over its whole frame period and stamps mid-exposure, so a frame's brightness is the lit
    fraction of its exposure."""
    rng = np.random.default_rng(seed)
    writer = LogWriter(str(path), preview_hz=0)
    chunk = RATE // 50  # 20 ms chunks
    duration_ns = 4_500_000_000
    offset_ns = round(offset_ms * 1e6)
    period_ns = 1e9 / fps
    events = []
    if video:
        for seq in range(int(duration_ns / period_ns)):
            t_ns = round(seq * period_ns)
            lit_ns = sum(max(0.0, min(t_ns + period_ns / 2, c + FLASH_NS)
                             - max(t_ns - period_ns / 2, c)) for c in claps)
            image = rng.integers(40, 60, (24, 32, 3)) + 150 * lit_ns / period_ns
            events.append((T0_NS + t_ns, Frame("camera.front", seq, T0_NS + t_ns,
                                               image.astype(np.uint8))))
    if audio:
        signal = rng.normal(0, 0.01, duration_ns * RATE // 1_000_000_000)
        for clap_ns in claps:
            start = (clap_ns + offset_ns) * RATE // 1_000_000_000
            n = RATE * 30 // 1000
            signal[start:start + n] += rng.normal(0, 0.5, n) * np.exp(-np.arange(n) / (n / 4))
        for seq, start in enumerate(range(0, len(signal), chunk)):
            t_ns = T0_NS + start * 1_000_000_000 // RATE
            samples = signal[start:start + chunk].astype(np.float32)[:, None]
            events.append((t_ns, AudioChunk("audio.mic0", seq, t_ns, RATE, start, samples)))
    for t_ns, msg in sorted(events, key=lambda e: e[0]):
        writer.write(msg, t_ns + 5_000_000)
    writer.close()


@pytest.mark.parametrize("fps, offset_ms", [
    (25, -80), (25, -40), (25, 0), (25, 40), (25, 80),
    # Offsets that are not multiples of the 33.3 ms frame period.
    (30, -67), (30, -13), (30, 27), (30, 53)])
def test_av_offset_of_synthesised_claps(tmp_path, fps, offset_ms):
    path = tmp_path / "clap.mcap"
    write_clap_log(path, offset_ms, seed=offset_ms + 100, fps=fps)
    estimate = estimate_av_offset(str(path))
    error_ms = estimate.offset_ns / 1e6 - offset_ms
    print(f"clap av offset {offset_ms:+d} ms at {fps} fps: estimated "
          f"{estimate.offset_ns / 1e6:+.1f} ms, error {error_ms:+.1f} ms, confidence "
          f"{estimate.confidence}")
    assert abs(error_ms) <= 10
    assert (estimate.audio, estimate.video, estimate.events) == ("audio.mic0", "camera.front", 3)
    assert estimate.confidence > 0.5


def test_av_offset_cli_writes_the_calibration_file(tmp_path, capsys):
    path = tmp_path / "clap.mcap"
    write_clap_log(path, 40)
    out = tmp_path / "calibration.yaml"
    assert main(["calibrate", "av-offset", str(path), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["offset_ms"] == pytest.approx(40, abs=10)
    calibration = load_calibration(out)
    assert calibration.av_offset is not None
    assert calibration.corrections_ns() == {"audio.mic0": calibration.av_offset.offset_ns}


def test_av_offset_of_a_log_with_no_clap_is_refused_and_nothing_written(tmp_path, capsys):
    path = tmp_path / "no-clap.mcap"
    write_clap_log(path, 0, claps=())
    out = tmp_path / "calibration.yaml"
    assert main(["calibrate", "av-offset", str(path), "--out", str(out)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "is below 0.3 (clap)" in lines[0], lines
    assert "nothing was written" in lines[0] and not out.exists()


@pytest.mark.parametrize("audio, video, message", [
    (False, True, "has no audio stream"), (True, False, "has no video stream")])
def test_av_offset_log_without_audio_or_video(tmp_path, capsys, audio, video, message):
    path = tmp_path / "half.mcap"
    write_clap_log(path, 0, audio=audio, video=video)
    assert main(["calibrate", "av-offset", str(path)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_av_offset_of_a_file_that_is_not_a_log(tmp_path, capsys):
    path = tmp_path / "notes.mcap"
    path.write_text("hello")
    assert main(["calibrate", "av-offset", str(path)]) == 1
    assert "not an MCAP file" in capsys.readouterr().err


# -- files and the node ---------------------------------------------------------------------

def test_the_sim_robot_calibration_loads():
    calibration = load_calibration(REPO / "calibration/sim/calibration.yaml")
    assert calibration.camera_info("camera.front").width == 640
    assert calibration.corrections_ns() == {}


@pytest.mark.parametrize("text, message", [
    ("delays_ms: {camera.front: fast}\n", "delays_ms.camera.front = 'fast' is not a number"),
    ("colour: red\n", "unknown key(s) ['colour']"),
    ("cameras: {camera.front: missing.yaml}\n", "cannot read camera_info"),
    ("av_offset: {audio: audio.mic0, offset_ms: 3}\n", "av_offset must be"),
    ("- a list\n", "must be a YAML mapping"),
    ("cameras: {camera.front: ../../etc/passwd}\n", "inside the calibration folder"),
    ("cameras: {camera.front: /etc/passwd}\n", "inside the calibration folder"),
])
def test_bad_calibration_files(tmp_path, text, message):
    path = tmp_path / "calibration.yaml"
    path.write_text(text)
    with pytest.raises(CalibrationError) as info:
        load_calibration(path)
    assert message in str(info.value) and str(path) in str(info.value)


CONTROLLER = """
[node]
pub = "ipc://{run_dir}/pub.ipc"
connect = ["{endpoint}"]
startup_timeout_ms = 2000
calibration = "{calibration}"

[[streams]]
name = "joints.arm"
kind = "joints"
"""


async def test_node_applies_calibrated_delays_and_reports_them(tmp_path):
    calibration = tmp_path / "calibration.yaml"
    calibration.write_text("delays_ms: {joints.arm: 7.5}\n")
    endpoint = f"ipc://{tmp_path}/controller.ipc"
    config = parse_config(CONTROLLER.replace("{endpoint}", endpoint).replace(
        "{run_dir}", str(tmp_path)).replace("{calibration}", str(calibration)), "test")
    context = zmq.Context()
    controller = Publisher(context, endpoint)
    node = Node(config)
    stop = asyncio.Event()
    task = asyncio.create_task(node.run(stop))
    stamps = []
    try:
        for seq in range(100):
            stamps.append(time.monotonic_ns())
            controller.send(JointState("joints.arm", seq, stamps[-1], ("a",), np.zeros(1),
                                       np.zeros(1), np.zeros(1)))
            await asyncio.sleep(0.01)
            if node.ready.is_set() and node.buffer.stats["joints.arm"].received > 10:
                break
        health = node.health()["streams"]["joints.arm"]
    finally:
        stop.set()
        await task
        controller.close()
        context.term()
    assert health["correction_ms"] == 7.5
    # The newest sample received (the last one sent may still be in flight) was moved back
    # by exactly the calibrated delay.
    assert node.buffer.stats["joints.arm"].last_capture_ns + 7_500_000 in stamps


def test_node_refuses_a_calibration_for_another_robot(tmp_path):
    calibration = tmp_path / "calibration.yaml"
    calibration.write_text("delays_ms: {camera.rear: 3}\n")
    config = parse_config(CONTROLLER.replace("{endpoint}", "ipc:///tmp/unused.ipc")
                          .replace("{calibration}", str(calibration)), "test")
    with pytest.raises(CalibrationError, match=r"\['camera.rear'\] that are not sensor streams"):
        Node(config)


def test_calibration_round_trip(tmp_path):
    from fusion_node.calibration import AvOffset, save_calibration

    path = tmp_path / "calibration.yaml"
    save_calibration(Calibration(str(path), "r1", {}, {"camera.front": 12_000_000},
                                 AvOffset("audio.mic0", "camera.front", -40_000_000),
                                 {"joints.arm": 50e-6}))
    loaded = load_calibration(path)
    assert loaded.delays_ns == {"camera.front": 12_000_000}
    assert loaded.corrections_ns() == {"camera.front": 12_000_000, "audio.mic0": -40_000_000}
    assert loaded.clock_drifts == {"joints.arm": pytest.approx(50e-6)}
