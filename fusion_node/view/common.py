"""What every view of a log shares: the Rerun viewer (`rerun.py`), the Foxglove export
(`foxglove.py`) and the PNG snapshot (`snapshot.py`) read the log, place the mouth box and
compute latency and action targets the same way, from here.

Imports neither rerun nor matplotlib: a view that needs only one of them does not load the
other.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fusion_node.config import NodeConfig
from fusion_node.errors import ConfigError
from fusion_node.protocol import AudioChunk, Frame, Message, Prediction

if TYPE_CHECKING:
    from fusion_node.logs.mcap_format import LogReader

log = logging.getLogger(__name__)

LATENCY_POINTS = ("t_receive_ns", "t_window_start_ns", "t_infer_end_ns", "t_ready_ns")
LATENCY_NAMES = ("capture→receive", "capture→window", "capture→inference end",
                 "capture→ready", "capture→publish")
# The schematic arm: base and link lengths as fractions of the image height.
_ARM_BASE = (0.8, 0.97)  # x as a fraction of the width, y of the height: beside the face
_ARM_LINKS = (0.15, 0.11, 0.06)


@dataclass(frozen=True)
class SpeechView:
    """What the viewer needs of a speech engine: its topic, camera and mouth box."""

    topic: str
    camera: str
    mouth_roi: tuple[int, int, int, int]


def speech_views(config: NodeConfig) -> list[SpeechView]:
    """The speech engines of `config` whose mouth box the viewer draws."""
    views = []
    for engine in config.engines:
        if engine.binding != "speech":
            continue
        roi = tuple(engine.params.get("mouth_roi", ()))
        if len(roi) != 4 or not all(isinstance(v, int) for v in roi):
            raise ConfigError(f"engine {engine.name!r}: params.mouth_roi must be [x, y, w, h] "
                              f"ints, got {engine.params.get('mouth_roi')!r}")
        views.append(SpeechView(engine.topic, engine.inputs["video"], roi))  # type: ignore[arg-type]
    return views


def rgb(frame: Frame) -> np.ndarray:
    """The frame's image with its channels in RGB order (a view: no copy)."""
    return frame.image if frame.encoding != "bgr8" else frame.image[..., ::-1]


def mouth_crop(image: np.ndarray, roi: tuple[int, int, int, int]) -> np.ndarray | None:
    """The mouth box `roi` (x, y, w, h) of `image`, clipped to the image (a view); None if
    the box lies wholly outside it."""
    x, y, w, h = roi
    height, width = image.shape[:2]
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(width, x + w), min(height, y + h)
    return image[y0:y1, x0:x1] if x0 < x1 and y0 < y1 else None


def waveform(chunk: AudioChunk) -> np.ndarray:
    """Channel 0 of the chunk as float64, full scale 1 (int16 samples scaled by 1/32768)."""
    samples = chunk.samples[:, 0]
    scale = 1.0 / 32768.0 if samples.dtype == np.int16 else 1.0
    return samples.astype(np.float64) * scale


def arm_points(angles: np.ndarray, width: int, height: int) -> np.ndarray:
    """Image points of a planar arm with joint `angles` (rad, each relative to the previous
    link; all zero points straight up): [len(angles) + 1, 2]."""
    points = [np.array([_ARM_BASE[0] * width, _ARM_BASE[1] * height])]
    heading = math.pi / 2
    for angle, length in zip(angles, _ARM_LINKS):
        heading += float(angle)
        step = length * height * np.array([math.cos(heading), -math.sin(heading)])
        points.append(points[-1] + step)
    return np.stack(points)


def latency_ms(pred: Prediction) -> list[float]:
    """Milliseconds from the capture of the newest input (the trace's `t_capture_ns`) to
    each point of LATENCY_NAMES; NaN where the trace lacks the point."""
    t_capture_ns = pred.trace.get("t_capture_ns", pred.t_ref_ns)
    points = [pred.trace.get(k) for k in LATENCY_POINTS] + [pred.t_publish_ns]
    return [math.nan if t is None else (t - t_capture_ns) / 1e6 for t in points]


def due_step(step_times_ns: np.ndarray, deadline_ns: int) -> int:
    """The step a control loop executes when the chunk arrives: the first one due at or
    after the deadline (the last one if all are earlier)."""
    return min(int(np.searchsorted(step_times_ns, deadline_ns)), len(step_times_ns) - 1)


def log_config(path: str) -> NodeConfig:
    """The launch config stored in the log `path`, else the embedded default."""
    from fusion_node.config import load_config
    from fusion_node.logs.mcap_format import LogReader
    from fusion_node.logs.replay import config_from_log

    with LogReader(path) as reader:
        config = config_from_log(path, reader.metadata())
    if config is None:
        log.info("%s holds no launch config: the mouth box is the embedded default's", path)
        return load_config(None)
    return config


def log_messages(reader: LogReader, path: str,
                 duration_s: float | None = None) -> Iterator[Message]:
    """The decoded protocol messages of the open LogReader `reader` on `path`, in log-time
    order: all of them, or those of the first `duration_s` seconds (by receive time)."""
    first_ns: int | None = None
    for message in reader.messages():
        if first_ns is None:
            first_ns = message.log_time_ns
        if duration_s is not None and message.log_time_ns - first_ns > duration_s * 1e9:
            return
        yield message.decode(path)
