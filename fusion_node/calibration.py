"""Calibration files and the tools that estimate them (DESIGN §9; layout in calibration/README.md).

A robot's folder holds `calibration.yaml` (per-sensor fixed delays, the audio-video offset,
remote clock drifts, and which camera_info file belongs to which camera) and one ROS
`camera_info` YAML per camera, so OpenCV and ROS tools read them unchanged. The node loads
them by explicit path from the launch file and never writes them.
"""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fusion_node.errors import CalibrationError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pgm", ".ppm")
_MAX_VIDEO_FRAMES = 40  # calibration gains little from more views; time grows with them
_MIN_VIEWS = 3
_IDENTITY = (1., 0., 0., 0., 1., 0., 0., 0., 1.)


# -- files ----------------------------------------------------------------------------------

@dataclass
class CameraInfo:
    """Intrinsics in the ROS sensor_msgs/CameraInfo layout (plumb_bob: k1 k2 p1 p2 k3)."""

    camera_name: str
    width: int
    height: int
    camera_matrix: list[float]  # row-major 3x3
    distortion: list[float]
    distortion_model: str = "plumb_bob"
    rectification: list[float] = field(default_factory=lambda: list(_IDENTITY))
    projection: list[float] = field(default_factory=list)  # row-major 3x4; empty: from K

    @property
    def fx(self) -> float:
        return self.camera_matrix[0]

    @property
    def fy(self) -> float:
        return self.camera_matrix[4]

    @property
    def cx(self) -> float:
        return self.camera_matrix[2]

    @property
    def cy(self) -> float:
        return self.camera_matrix[5]


def _matrix(rows: int, cols: int, data: list[float]) -> dict[str, Any]:
    return {"rows": rows, "cols": cols, "data": [float(v) for v in data]}


def save_camera_info(path: str | Path, info: CameraInfo) -> None:
    """Write `info` as a ROS camera_info YAML (camera_calibration_parsers' layout)."""
    k = info.camera_matrix
    projection = info.projection or [k[0], k[1], k[2], 0., k[3], k[4], k[5], 0., 0., 0., 1., 0.]
    data = {
        "image_width": info.width, "image_height": info.height,
        "camera_name": info.camera_name,
        "camera_matrix": _matrix(3, 3, k),
        "distortion_model": info.distortion_model,
        "distortion_coefficients": _matrix(1, len(info.distortion), info.distortion),
        "rectification_matrix": _matrix(3, 3, info.rectification),
        "projection_matrix": _matrix(3, 4, projection),
    }
    try:
        Path(path).write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=None))
    except OSError as exc:
        raise CalibrationError(f"cannot write camera_info {str(path)!r}: {exc.strerror}") \
            from None


def _read_yaml(path: str | Path, what: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise CalibrationError(f"cannot read {what} {str(path)!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise CalibrationError(f"{what} {str(path)!r} is not valid YAML ({exc})") from None
    # PyYAML lets these through: a bad tagged scalar (`!!int x`, `!!binary ?`) raises
    # ValueError, and deep nesting exhausts its recursive constructor.
    except (ValueError, RecursionError) as exc:
        raise CalibrationError(f"{what} {str(path)!r} is not valid YAML "
                               f"({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise CalibrationError(f"{what} {str(path)!r} must be a YAML mapping, got "
                               f"{type(data).__name__}")
    return data


def _floats(data: dict[str, Any], key: str, size: int | None, where: str) -> list[float]:
    node = data.get(key)
    values = node.get("data") if isinstance(node, dict) else None
    if (not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values)
            or (size is not None and len(values) != size)):
        count = "a list of numbers" if size is None else f"{size} numbers"
        raise CalibrationError(f"{where}: {key}.data must be {count}, got {values!r}")
    return [float(v) for v in values]


def load_camera_info(path: str | Path) -> CameraInfo:
    """Read a ROS camera_info YAML; CalibrationError naming the file and the bad key."""
    where = f"camera_info {str(path)!r}"
    data = _read_yaml(path, "camera_info")
    width, height = data.get("image_width"), data.get("image_height")
    if type(width) is not int or type(height) is not int or width <= 0 or height <= 0:
        raise CalibrationError(f"{where}: image_width/image_height must be positive integers, "
                               f"got {width!r}/{height!r}")
    return CameraInfo(
        camera_name=str(data.get("camera_name", "")), width=width, height=height,
        camera_matrix=_floats(data, "camera_matrix", 9, where),
        distortion=_floats(data, "distortion_coefficients", None, where),
        distortion_model=str(data.get("distortion_model", "plumb_bob")),
        rectification=(_floats(data, "rectification_matrix", 9, where)
                       if "rectification_matrix" in data else list(_IDENTITY)),
        projection=(_floats(data, "projection_matrix", 12, where)
                    if "projection_matrix" in data else []))


@dataclass(frozen=True)
class AvOffset:
    """Audio stamp minus video stamp of one event; the node subtracts it from audio stamps."""

    audio: str
    video: str
    offset_ns: int


@dataclass
class Calibration:
    """A robot's calibration.yaml with the camera_info files it names."""

    path: str
    robot: str = ""
    cameras: dict[str, str] = field(default_factory=dict)  # stream -> camera_info path
    delays_ns: dict[str, int] = field(default_factory=dict)  # stream -> capture-to-stamp delay
    av_offset: AvOffset | None = None
    clock_drifts: dict[str, float] = field(default_factory=dict)  # stream -> drift (50e-6)

    def corrections_ns(self) -> dict[str, int]:
        """Per stream, what the node subtracts from each sample's capture stamp."""
        corrections = {stream: delay for stream, delay in self.delays_ns.items() if delay}
        if self.av_offset is not None and self.av_offset.offset_ns:
            audio = self.av_offset.audio
            corrections[audio] = corrections.get(audio, 0) + self.av_offset.offset_ns
        return corrections

    def streams(self) -> set[str]:
        """Every stream this calibration names."""
        named = set(self.cameras) | set(self.delays_ns) | set(self.clock_drifts)
        if self.av_offset is not None:
            named |= {self.av_offset.audio, self.av_offset.video}
        return named

    def camera_info(self, stream: str) -> CameraInfo:
        if stream not in self.cameras:
            raise CalibrationError(f"calibration {self.path!r} has no camera_info for "
                                   f"{stream!r} (cameras: {sorted(self.cameras)})")
        return load_camera_info(Path(self.path).parent / self.cameras[stream])


_TOP_KEYS = ("robot", "cameras", "delays_ms", "av_offset", "clocks")


def _mapping(data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise CalibrationError(f"{where}: {key} must map stream names to values, got {value!r}")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CalibrationError(f"{where} = {value!r} is not a number")
    return float(value)


def _ms_to_ns(value: Any, where: str) -> int:
    ns = _number(value, where) * 1e6
    if not abs(ns) < 2**63:  # a finite 1e308 ms still overflows int64 nanoseconds
        raise CalibrationError(f"{where} = {value!r} ms is out of range")
    return round(ns)


def load_calibration(path: str | Path) -> Calibration:
    """Read a robot's calibration.yaml; every camera_info it names is read and checked too."""
    where = f"calibration {str(path)!r}"
    data = _read_yaml(path, "calibration")
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise CalibrationError(f"{where}: unknown key(s) {unknown}; allowed: {_TOP_KEYS}")
    cameras = _mapping(data, "cameras", where)
    if not all(isinstance(v, str) for v in cameras.values()):
        raise CalibrationError(f"{where}: cameras must map streams to camera_info file names")
    for stream, name in cameras.items():
        # camera_info files live in the calibration folder: no absolute paths, no "..".
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CalibrationError(f"{where}: cameras.{stream} = {name!r} must be a file "
                                   "inside the calibration folder")
    delays_ns = {stream: _ms_to_ns(v, f"{where}: delays_ms.{stream}")
                 for stream, v in _mapping(data, "delays_ms", where).items()}
    clock_drifts = {}
    for stream, entry in _mapping(data, "clocks", where).items():
        if not isinstance(entry, dict) or set(entry) != {"drift_ppm"}:
            raise CalibrationError(f"{where}: clocks.{stream} must be {{drift_ppm: N}}, "
                                   f"got {entry!r}")
        clock_drifts[stream] = _number(entry["drift_ppm"], f"{where}: clocks.{stream}") * 1e-6
    av_offset = None
    if data.get("av_offset") is not None:
        entry = data["av_offset"]
        if (not isinstance(entry, dict) or set(entry) != {"audio", "video", "offset_ms"}
                or not isinstance(entry["audio"], str) or not isinstance(entry["video"], str)):
            raise CalibrationError(f"{where}: av_offset must be {{audio: STREAM, video: STREAM, "
                                   f"offset_ms: N}}, got {entry!r}")
        av_offset = AvOffset(entry["audio"], entry["video"],
                             _ms_to_ns(entry["offset_ms"], f"{where}: av_offset"))
    calibration = Calibration(str(path), str(data.get("robot", "")), dict(cameras), delays_ns,
                              av_offset, clock_drifts)
    for stream in cameras:
        try:
            calibration.camera_info(stream)
        except CalibrationError as exc:
            raise CalibrationError(f"{where}: cameras.{stream}: {exc}") from None
    return calibration


def save_calibration(calibration: Calibration) -> None:
    """Write calibration.yaml (tools only: the node never writes calibration)."""
    data: dict[str, Any] = {"robot": calibration.robot, "cameras": calibration.cameras,
                            "delays_ms": {s: d / 1e6 for s, d in calibration.delays_ns.items()}}
    if calibration.av_offset is not None:
        data["av_offset"] = {"audio": calibration.av_offset.audio,
                             "video": calibration.av_offset.video,
                             "offset_ms": calibration.av_offset.offset_ns / 1e6}
    data["clocks"] = {s: {"drift_ppm": d * 1e6} for s, d in calibration.clock_drifts.items()}
    try:
        Path(calibration.path).write_text(yaml.safe_dump(data, sort_keys=False))
    except OSError as exc:
        raise CalibrationError(f"cannot write calibration {calibration.path!r}: "
                               f"{exc.strerror}") from None


# -- camera intrinsics ----------------------------------------------------------------------

@dataclass
class CameraCalibration:
    info: CameraInfo
    rms_px: float  # reprojection error over every detected corner
    used: list[str]
    failed: list[str]  # views in which the board was not found


def parse_board(text: str) -> tuple[int, int]:
    """'9x6' -> (9, 6): inner corners per row and per column, as OpenCV counts them."""
    cols, sep, rows = text.lower().partition("x")
    if not sep or not cols.isdigit() or not rows.isdigit() or int(cols) < 2 or int(rows) < 2:
        raise CalibrationError(f"board {text!r} must be COLSxROWS inner corners, e.g. 9x6")
    return int(cols), int(rows)


def _views(source: str) -> list[tuple[str, np.ndarray]]:
    """Grey images from a folder, a glob, an image file or a video file."""
    import cv2

    if os.path.isdir(source):
        paths = sorted(p for p in glob.glob(os.path.join(source, "*"))
                       if p.lower().endswith(IMAGE_SUFFIXES))
    elif any(ch in source for ch in "*?["):
        paths = sorted(glob.glob(source))
    elif source.lower().endswith(IMAGE_SUFFIXES):
        paths = [source]
    else:
        return _video_views(source)
    if not paths:
        raise CalibrationError(f"no images found at {source!r} (looked for {IMAGE_SUFFIXES})")
    views = []
    for path in paths:
        image = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise CalibrationError(f"cannot read image {path!r} (missing, or not an image)")
        views.append((path, image))
    return views


def _video_views(source: str) -> list[tuple[str, np.ndarray]]:
    import cv2

    if not os.path.isfile(source):
        raise CalibrationError(f"{source!r} is not a folder, image, glob or video file")
    capture = cv2.VideoCapture(source)
    try:
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        if not capture.isOpened() or count <= 0:
            raise CalibrationError(f"cannot read video {source!r} (not a video OpenCV can "
                                   "decode)")
        step = max(1, count // _MAX_VIDEO_FRAMES)
        views = []
        for index in range(count):
            ok, frame = capture.read()
            if not ok:
                break
            if index % step == 0:
                views.append((f"{source}#{index}", cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)))
    finally:
        capture.release()
    if not views:
        raise CalibrationError(f"video {source!r} has no decodable frames")
    return views


def calibrate_camera(source: str, board: tuple[int, int], square_mm: float,
                     camera_name: str = "camera") -> CameraCalibration:
    """OpenCV checkerboard calibration from images or a video; CalibrationError if the views
    are unreadable, of mixed sizes, or show the board fewer than three times."""
    import cv2

    if not square_mm > 0:
        raise CalibrationError(f"square size {square_mm} mm must be positive")
    cols, rows = board
    grid = np.zeros((cols * rows, 3), np.float32)
    grid[:, :2] = np.mgrid[0:cols, 0:rows].T.reshape(-1, 2) * square_mm
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 50, 1e-4)
    views = _views(source)
    size = views[0][1].shape[::-1]
    object_points, image_points, used, failed = [], [], [], []
    for name, image in views:
        if image.shape[::-1] != size:
            raise CalibrationError(f"image {name!r} is {image.shape[1]}x{image.shape[0]}, the "
                                   f"first was {size[0]}x{size[1]}: one camera mode at a time")
        found, corners = cv2.findChessboardCorners(
            image, board, flags=cv2.CALIB_CB_ADAPTIVE_THRESH | cv2.CALIB_CB_NORMALIZE_IMAGE)
        if not found:
            failed.append(name)
            continue
        corners = cv2.cornerSubPix(image, corners, (5, 5), (-1, -1), criteria)
        object_points.append(grid)
        image_points.append(corners)
        used.append(name)
    if len(used) < _MIN_VIEWS:
        raise CalibrationError(f"board {cols}x{rows} found in {len(used)} of {len(views)} views "
                               f"of {source!r}; need at least {_MIN_VIEWS} (check --board: "
                               "inner corners, not squares)")
    # k3 fixed at 0, as ROS camera_calibration does: for ordinary lenses it is poorly
    # constrained and trades off against k1, k2.
    rms, matrix, distortion, _, _ = cv2.calibrateCamera(
        object_points, image_points, size, None, None, flags=cv2.CALIB_FIX_K3,
        criteria=criteria)
    info = CameraInfo(camera_name, int(size[0]), int(size[1]),
                      [float(v) for v in matrix.ravel()], [float(v) for v in distortion.ravel()])
    return CameraCalibration(info, float(rms), used, failed)


# -- audio-video offset ---------------------------------------------------------------------

@dataclass
class AvOffsetEstimate:
    audio: str
    video: str
    offset_ns: int  # audio stamp minus video stamp of the same event
    confidence: float  # 0..1: how much the best shift stands out from the next-best one
    events: int  # visible onsets that took part


_GRID_NS = 1_000_000  # the audio onset envelope and the shift search step
# A brightness rise of this fraction of the largest one starts a visible event; smaller rises
# next to it (frames exposed while the flash began) belong to the same event.
_ONSET_SEED = 0.3
_ONSET_EXTEND = 0.05


def pick_stream(topics: list[str], wanted: str | None, kind: str, path: str,
                all_topics: list[str]) -> str:
    """`wanted` if the log has it among `topics`, else the first of them; CalibrationError
    naming the log and its streams if there is none."""
    if wanted is not None:
        if wanted not in topics:
            raise CalibrationError(f"log {path!r} has no {kind} stream {wanted!r} "
                                   f"({kind} streams: {topics})")
        return wanted
    if not topics:
        raise CalibrationError(f"log {path!r} has no {kind} stream (topics: {all_topics}): "
                               "record the camera and the microphone together")
    return topics[0]


def estimate_av_offset(path: str, audio: str | None = None, video: str | None = None,
                       max_shift_ms: float = 500.0) -> AvOffsetEstimate:
    """The audio-video offset of a log in which something is seen and heard at once (a clap,
    a flash and a beep): cross-correlate the onsets of frame brightness with those of sound
    energy over shifts up to `max_shift_ms`. Resolution: 1 ms on the audio side; on the video
    side an event is placed between frames (`_visible_onsets`)."""
    from fusion_node.logs.mcap_format import LogReader
    from fusion_node.protocol import AudioChunk, Frame

    with LogReader(path) as reader:
        all_topics = reader.topics()
        audio = pick_stream(reader.topics(["audio"]), audio, "audio", path, all_topics)
        video = pick_stream(reader.topics(["frame"]), video, "video", path, all_topics)
        frame_ns, brightness, chunks = [], [], []
        for message in reader.messages([audio, video]):
            msg = message.decode(path)
            if isinstance(msg, Frame):
                frame_ns.append(msg.t_capture_ns)
                brightness.append(float(msg.image.mean()))
            elif isinstance(msg, AudioChunk):
                chunks.append(msg)
    if len(frame_ns) < 2 or not chunks:
        raise CalibrationError(f"log {path!r}: {len(frame_ns)} frames on {video!r} and "
                               f"{len(chunks)} audio chunks on {audio!r}; need both")
    order = np.argsort(frame_ns, kind="stable")
    t_frames = np.asarray(frame_ns, np.int64)[order]
    t_events, weights = _visible_onsets(t_frames, np.asarray(brightness)[order])
    # Audio on one timeline from sample_index (exact), anchored at the first chunk's stamp.
    first = min(chunks, key=lambda c: c.sample_index)
    rate = first.sample_rate
    total = max(c.sample_index + len(c.samples) for c in chunks) - first.sample_index
    signal = np.zeros(total, np.float64)
    for chunk in chunks:
        start = chunk.sample_index - first.sample_index
        samples = chunk.samples.astype(np.float64)
        signal[start:start + len(samples)] = np.abs(samples).mean(axis=1) if samples.ndim > 1 \
            else np.abs(samples)
    per_bin = max(1, rate * _GRID_NS // 1_000_000_000)
    energy = signal[: len(signal) // per_bin * per_bin].reshape(-1, per_bin).mean(axis=1)
    audible = np.maximum(np.diff(energy, prepend=energy[:1]), 0.0)
    t_audio0_ns = first.t_capture_ns
    if not len(t_events) or not audible.any():
        raise CalibrationError(f"log {path!r}: no visible or no audible event to align "
                               "(record a clap or a flash with a beep)")
    max_shift = round(max_shift_ms * 1e6 / _GRID_NS)
    shifts = np.arange(-max_shift, max_shift + 1)
    scores = np.zeros(len(shifts))
    base = np.round((t_events - t_audio0_ns) / _GRID_NS).astype(np.int64)
    for i, shift in enumerate(shifts):
        index = base + shift
        ok = (index >= 0) & (index < len(audible))
        scores[i] = float((weights[ok] * audible[index[ok]]).sum())
    best = int(np.argmax(scores))
    if scores[best] <= 0:
        raise CalibrationError(f"log {path!r}: no sound onset within ±{max_shift_ms} ms of the "
                               "visible events")
    # Confidence: the best score against the best one outside a frame period of it.
    frame_period = int(np.median(np.diff(t_frames))) // _GRID_NS
    away = np.abs(shifts - shifts[best]) > max(frame_period, 1)
    runner_up = float(scores[away].max()) if away.any() else 0.0
    confidence = 1.0 - runner_up / float(scores[best])
    return AvOffsetEstimate(audio, video, int(shifts[best]) * _GRID_NS, round(confidence, 3),
                            len(t_events))


def _visible_onsets(t_frames: np.ndarray, brightness: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Stamp times (float ns) and sizes of the strong brightness rises, placed between frames.

    A rise seen over consecutive frames (a frame exposed while the flash began is partly lit)
    is one event. With f_j the lit fraction of each frame of the rise (0 before it, 1 after)
    and T the frame period, the onset is t_last + T/2 - T * sum(f_j): the lit time summed over
    the exposures. That is exact for a camera exposing over its whole frame period, stamped
    mid-exposure; for a short exposure (a dark frame, then a lit one) it gives the midpoint
    between the two frames, the unbiased guess, so several claps average the error down."""
    rise = np.diff(brightness)
    largest = float(rise.max()) if len(rise) else 0.0
    if largest <= 0:
        return np.zeros(0), np.zeros(0)
    times, sizes = [], []
    step = 0
    while step < len(rise):
        if rise[step] < _ONSET_SEED * largest:
            step += 1
            continue
        # Extend over the neighbouring smaller rises of the same event (partial exposures).
        first, last = step, step
        while first > 0 and rise[first - 1] > _ONSET_EXTEND * largest:
            first -= 1
        while last + 1 < len(rise) and rise[last + 1] > _ONSET_EXTEND * largest:
            last += 1
        low, high = brightness[first], brightness[last + 1]
        lit = np.clip((brightness[first + 1:last + 2] - low) / (high - low), 0.0, 1.0)
        period = (t_frames[last + 1] - t_frames[first]) / (last + 1 - first)
        times.append(t_frames[last + 1] + period * (0.5 - lit.sum()))
        sizes.append(high - low)
        step = last + 1
    t_events, weights = np.asarray(times, np.float64), np.asarray(sizes, np.float64)
    # Only strong events take part, so slow lighting changes do not vote.
    strong = weights >= 0.5 * weights.max()
    return t_events[strong], weights[strong]
