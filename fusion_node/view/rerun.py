"""`fusion-node view`: what the node sees and says, in Rerun (https://rerun.io).

`RerunLogger` turns protocol messages into Rerun entities; `view_live` feeds it from sockets
(a separate subscriber: the node's PUB sockets drop messages for a slow viewer rather than
wait for it), `view_log` from an MCAP log. Entities, on the `sensor_time` timeline
(CLOCK_MONOTONIC capture time; a prediction at its `t_ref_ns`):

  camera/<stream>                   the scene, JPEG, at 1/stride resolution
  camera/<stream>/mouth_roi         the speech engine's mouth box, labelled with the score
  camera/<stream>/action_chunk      the last action chunk drawn as a schematic planar arm
  mouth/<stream>                    the mouth crop the speech engine sees (full resolution)
  audio/<stream>/waveform           every sample of channel 0, in [-1, 1]
  <pred topic>/voice_activity, /active_speaker, /command_posterior, /command
  <pred topic>/targets              the chunk's step due at publication, per joint
  joints/<stream>/position          measured joint positions, per joint
  latency/<pred topic>              capture → receive, window, inference end, ready, publish
  deadline_misses/<pred topic>      cumulative late predictions (the `late` flag)
  events                            a line per late prediction or command change
  health/<engine>/deadline_misses   the node's own count, from node.health

The arm overlay is a schematic, not a projection: the simulated camera does not see the arm
and there is no hand-eye calibration, so the chunk is drawn as a 3-link planar arm in a
corner of the image, to show its shape and motion at a glance.

Imports rerun (the `view` extra) at module level: import this module only to view.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import rerun as rr
import rerun.blueprint as rrb

from engines.vocabulary import COMMANDS
from fusion_node.clock import MonotonicClock
from fusion_node.config import NodeConfig
from fusion_node.errors import ConfigError, FusionError
from fusion_node.protocol import (
    AudioChunk,
    Frame,
    Health,
    JointState,
    Message,
    Prediction,
    SeqCounter,
)
from fusion_node.view.common import (
    LATENCY_NAMES,
    SpeechView,
    arm_points,
    due_step,
    latency_ms,
    log_config,
    log_messages,
    mouth_crop,
    rgb,
    speech_views,
    waveform,
)

APPLICATION_ID = "fusion-node"
TIMELINE = "sensor_time"
DEFAULT_IMAGE_STRIDE = 2  # half resolution, as the Foxglove preview: enough to see the scene
DEFAULT_JPEG_QUALITY = 80
_RECV_TIMEOUT_MS = 100
_GREEN, _GREY, _RED = (40, 200, 60), (200, 200, 200), (230, 50, 50)


def live_endpoints(config: NodeConfig) -> list[str]:
    """Where a running node built from `config` publishes: its predictions and health, and
    the sensor drivers that bind a known endpoint (an explicit `endpoint`, or the
    `run_dir`'s ipc sockets); without a `run_dir` the drivers' sockets are in a temporary
    directory nobody else can name, and only predictions and health are seen."""
    endpoints = [config.pub]
    for driver in config.drivers:
        if driver.endpoint:
            endpoints.append(driver.endpoint)
        elif config.run_dir:
            endpoints.append(f"ipc://{config.run_dir}/{driver.stream}.ipc")
    return endpoints + list(config.connect)


def _time(ns: int) -> np.timedelta64:
    return np.timedelta64(int(ns), "ns")


@dataclass
class ViewStats:
    """What the viewer received: counts, gaps in `seq`, late predictions, rejections."""

    received: Counter[str] = field(default_factory=Counter)
    seq: defaultdict[str, SeqCounter] = field(default_factory=lambda: defaultdict(SeqCounter))
    late: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    health_deadline_misses: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def seq_gaps(self) -> dict[str, int]:
        """Messages lost upstream, per stream that lost any."""
        return {stream: seq.gaps for stream, seq in self.seq.items() if seq.gaps}

    def summary(self) -> dict[str, Any]:
        return {"received": dict(self.received), "seq_gaps": self.seq_gaps,
                "late_predictions": dict(self.late), "rejected": dict(self.rejected),
                "node_deadline_misses": self.health_deadline_misses,
                "wall_s": round(self.wall_s, 3)}


class RerunLogger:
    """Logs protocol messages into one Rerun recording; call `log` in arrival order."""

    def __init__(self, recording: rr.RecordingStream, speech: Sequence[SpeechView] = (),
                 image_stride: int = DEFAULT_IMAGE_STRIDE,
                 jpeg_quality: int = DEFAULT_JPEG_QUALITY) -> None:
        if image_stride < 1:
            raise ConfigError(f"image stride {image_stride} must be >= 1")
        if not 1 <= jpeg_quality <= 100:
            raise ConfigError(f"JPEG quality {jpeg_quality} must be in 1..100")
        self.rec = recording
        self.stride = image_stride
        self.jpeg_quality = jpeg_quality
        self._speech_by_topic = {s.topic: s for s in speech}
        self._speech_by_camera = {s.camera: s for s in speech}
        self._image_size: dict[str, tuple[int, int]] = {}  # camera -> logged (width, height)
        self._last_command: dict[str, str] = {}
        self._static_done: set[str] = set()
        self.stats = ViewStats()

    # -- dispatch ---------------------------------------------------------------------------

    def log(self, msg: Message) -> None:
        """Log one message: its entities appear at its sensor time."""
        self.stats.received[msg.stream] += 1
        self.stats.seq[msg.stream].note(msg.seq)
        if isinstance(msg, Frame):
            self._frame(msg)
        elif isinstance(msg, AudioChunk):
            self._audio(msg)
        elif isinstance(msg, JointState):
            self._joints(msg)
        elif isinstance(msg, Prediction):
            self._prediction(msg)
        elif isinstance(msg, Health):
            self._health(msg)

    def _once(self, path: str, *entities: Any) -> None:
        if path not in self._static_done:
            self._static_done.add(path)
            self.rec.log(path, *entities, static=True)

    # -- sensors ----------------------------------------------------------------------------

    def _frame(self, frame: Frame) -> None:
        image = rgb(frame)
        small = np.ascontiguousarray(image[::self.stride, ::self.stride])
        height, width = small.shape[:2]
        self._image_size[frame.stream] = (width, height)
        # cv2 encodes BGR; the frame is in shared memory only until its lease ends, and
        # both the JPEG and the crop below are copies.
        bgr = small[..., ::-1] if small.shape[2] == 3 else small
        ok, jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        if not ok:
            raise ConfigError(f"{frame.stream}: JPEG encoding of a {small.shape} frame failed")
        self.rec.set_time(TIMELINE, duration=_time(frame.t_capture_ns))
        self.rec.log(f"camera/{frame.stream}",
                     rr.EncodedImage(contents=jpeg.tobytes(), media_type="image/jpeg"))
        speech = self._speech_by_camera.get(frame.stream)
        crop = mouth_crop(image, speech.mouth_roi) if speech is not None else None
        if crop is not None:
            self.rec.log(f"mouth/{frame.stream}", rr.Image(
                np.ascontiguousarray(crop), color_model="L" if crop.shape[2] == 1 else "RGB"))

    def _audio(self, chunk: AudioChunk) -> None:
        values = waveform(chunk)
        offsets = np.arange(len(values), dtype=np.int64) * 1_000_000_000 // chunk.sample_rate
        times = (chunk.t_capture_ns + offsets).astype("timedelta64[ns]")
        path = f"audio/{chunk.stream}/waveform"
        self._once(path, rr.SeriesLines(names=[chunk.stream], widths=[0.5]))
        self.rec.send_columns(path, indexes=[rr.TimeColumn(TIMELINE, duration=times)],
                              columns=rr.Scalars.columns(scalars=values))

    def _joints(self, state: JointState) -> None:
        path = f"joints/{state.stream}/position"
        self._once(path, rr.SeriesLines(names=[f"{n} measured" for n in state.names]))
        self.rec.set_time(TIMELINE, duration=_time(state.t_capture_ns))
        self.rec.log(path, rr.Scalars(np.asarray(state.position, np.float64)))

    # -- predictions ------------------------------------------------------------------------

    def _prediction(self, pred: Prediction) -> None:
        self.rec.set_time(TIMELINE, duration=_time(pred.t_ref_ns))
        self._latency(pred)
        if "command_posterior" in pred.arrays:
            self._speech(pred)
        if "actions" in pred.arrays and "step_times_ns" in pred.arrays:
            self._action(pred)

    def _latency(self, pred: Prediction) -> None:
        path = f"latency/{pred.stream}"
        self._once(path, rr.SeriesLines(names=list(LATENCY_NAMES)))
        self.rec.log(path, rr.Scalars(latency_ms(pred)))
        if pred.late:
            self.stats.late[pred.stream] += 1
            late_ms = (pred.t_publish_ns - pred.deadline_ns) / 1e6
            self.rec.log("events", rr.TextLog(
                f"{pred.stream} seq {pred.seq} late: published {late_ms:.2f} ms after its "
                "deadline", level="WARN"))
        misses = f"deadline_misses/{pred.stream}"
        self._once(misses, rr.SeriesLines(names=[f"{pred.stream} late"], colors=[_RED]))
        self.rec.log(misses, rr.Scalars(float(self.stats.late[pred.stream])))

    def _speech(self, pred: Prediction) -> None:
        fields, topic = pred.fields, pred.stream
        for name in ("voice_activity", "active_speaker"):
            value = fields.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._once(f"{topic}/{name}", rr.SeriesLines(names=[name]))
                self.rec.log(f"{topic}/{name}", rr.Scalars(float(value)))
        posterior = np.asarray(pred.arrays["command_posterior"], np.float64)
        names = list(COMMANDS) if len(posterior) == len(COMMANDS) else [
            f"class {i}" for i in range(len(posterior))]
        self._once(f"{topic}/command_posterior", rr.SeriesLines(names=names))
        self.rec.log(f"{topic}/command_posterior", rr.Scalars(posterior))
        command = fields.get("command")
        if isinstance(command, str) and command != self._last_command.get(topic):
            self._last_command[topic] = command
            confidence = fields.get("command_confidence")
            detail = f" ({confidence:.2f})" if isinstance(confidence, float) else ""
            self.rec.log(f"{topic}/command", rr.TextLog(f"{command}{detail}", level="INFO"))
        speech = self._speech_by_topic.get(topic)
        score = fields.get("active_speaker")
        size = self._image_size.get(speech.camera) if speech is not None else None
        if speech is not None and size is not None and isinstance(score, float):
            x, y, w, h = (v / self.stride for v in speech.mouth_roi)
            talking = bool(fields.get("speaker_visible_talking"))
            self.rec.log(f"camera/{speech.camera}/mouth_roi", rr.Boxes2D(
                mins=[[x, y]], sizes=[[w, h]], labels=[f"active speaker {score:.2f}"],
                colors=[_GREEN if talking else _GREY], show_labels=True))

    def _action(self, pred: Prediction) -> None:
        actions = np.asarray(pred.arrays["actions"], np.float64)
        step_times = np.asarray(pred.arrays["step_times_ns"], np.int64)
        if actions.ndim != 2 or len(actions) == 0 or len(step_times) != len(actions):
            return
        names = pred.fields.get("joint_names")
        if not (isinstance(names, list) and len(names) == actions.shape[1]):
            names = [f"joint {i}" for i in range(actions.shape[1])]
        due = due_step(step_times, pred.deadline_ns)  # drawn at its own time
        path = f"{pred.stream}/targets"
        self._once(path, rr.SeriesLines(names=[f"{n} target" for n in names]))
        self.rec.set_time(TIMELINE, duration=_time(int(step_times[due])))
        self.rec.log(path, rr.Scalars(actions[due]))
        self.rec.set_time(TIMELINE, duration=_time(pred.t_ref_ns))
        for camera, (width, height) in self._image_size.items():
            first = arm_points(actions[0], width, height)
            last = arm_points(actions[-1], width, height)
            tip = np.stack([arm_points(a, width, height)[-1] for a in actions])
            # Grey: the arm at the chunk's first step; green: at its last; yellow: the tip's
            # path through every step.
            self.rec.log(f"camera/{camera}/action_chunk", rr.LineStrips2D(
                [first, last, tip], colors=[_GREY, _GREEN, (250, 200, 40)],
                radii=[1.0, 1.5, 1.0]))

    def _health(self, health: Health) -> None:
        engines = health.stats.get("engines")
        if not isinstance(engines, dict):
            return
        self.rec.set_time(TIMELINE, duration=_time(health.t_capture_ns))
        for name, stats in engines.items():
            misses = stats.get("deadline_misses") if isinstance(stats, dict) else None
            if isinstance(misses, int) and not isinstance(misses, bool):
                self.stats.health_deadline_misses[name] = misses
                self.rec.log(f"health/{name}/deadline_misses", rr.Scalars(float(misses)))


def blueprint(cameras: Iterable[str], audio: Iterable[str], joints: Iterable[str],
              speech: Iterable[str], action: Iterable[str]) -> rrb.Blueprint:
    """The default layout: scene and mouth on the left, time series on the right."""
    cameras, audio, joints = list(cameras), list(audio), list(joints)
    speech, action = list(speech), list(action)
    images: list[Any] = [rrb.Spatial2DView(name=c, origin=f"camera/{c}") for c in cameras]
    images += [rrb.Spatial2DView(name=f"mouth {c}", origin=f"mouth/{c}") for c in cameras]
    series: list[Any] = [rrb.TimeSeriesView(
        name="audio and voice activity",
        contents=[f"audio/{a}/waveform" for a in audio]
        + [f"{s}/{n}" for s in speech for n in ("voice_activity", "active_speaker")])]
    series += [rrb.TimeSeriesView(name=f"{s} command posterior",
                                  contents=[f"{s}/command_posterior"]) for s in speech]
    series.append(rrb.TimeSeriesView(
        name="joints: measured and targets",
        contents=[f"joints/{j}/position" for j in joints] + [f"{a}/targets" for a in action]))
    series.append(rrb.TimeSeriesView(name="latency from capture (ms)",
                                     contents=["latency/**"]))
    series.append(rrb.TimeSeriesView(name="deadline misses",
                                     contents=["deadline_misses/**", "health/**"]))
    logs = rrb.TextLogView(name="events", contents=["events", *(f"{s}/command" for s in speech)])
    # Following the newest data: live, the views keep up with the node; for a log, they
    # open on its end, with every panel filled (scrub the timeline to go back).
    return rrb.Blueprint(
        rrb.Horizontal(rrb.Vertical(*images, logs,
                                    row_shares=[3] * len(cameras) + [2] * len(cameras) + [2]),
                       rrb.Vertical(*series), column_shares=[2, 3]),
        rrb.BlueprintPanel(state="collapsed"), rrb.SelectionPanel(state="collapsed"),
        rrb.TimePanel(state="expanded", timeline=TIMELINE, play_state="following"))


def open_recording(save: str | None, connect: str | None, recording_id: str | None,
                   layout: rrb.Blueprint) -> rr.RecordingStream:
    """A recording that writes an .rrd (`save`), streams to a viewer at `connect`, or
    spawns a local viewer; wall-clock log time is off (the node's clock is the timeline)."""
    recording = rr.RecordingStream(APPLICATION_ID, recording_id=recording_id)
    recording.set_log_time_enabled(False)
    recording.set_log_tick_enabled(False)
    if save is not None:
        recording.save(save, default_blueprint=layout)
    elif connect is not None:
        recording.connect_grpc(connect, default_blueprint=layout)
    else:
        if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY")
                                                     or os.environ.get("WAYLAND_DISPLAY")):
            # A viewer spawned without one fails in the background and the log waits on it.
            raise FusionError("no display for a Rerun viewer (DISPLAY and WAYLAND_DISPLAY are "
                              "unset); use --save FILE.rrd or --snapshot FILE.png, or "
                              "--connect to a viewer running elsewhere")
        # The viewer binary comes with rerun-sdk beside this interpreter: found there even
        # when the virtual environment is not activated.
        bin_dir = os.path.dirname(sys.executable)
        path = os.environ.get("PATH", "")
        if bin_dir not in path.split(os.pathsep):
            os.environ["PATH"] = os.pathsep.join(p for p in (bin_dir, path) if p)
        try:
            recording.spawn(default_blueprint=layout)
        except RuntimeError as exc:
            raise FusionError(f"cannot start a Rerun viewer ({str(exc).splitlines()[0]}); "
                            "use --save FILE.rrd or --snapshot FILE.png, or --connect to a "
                            "viewer running elsewhere") from None
    return recording


def _kind_of_topics(config: NodeConfig) -> dict[str, list[str]]:
    kinds: dict[str, list[str]] = {"frame": [], "audio": [], "joints": []}
    for driver in config.drivers:
        kinds.setdefault(driver.sample_kind, []).append(driver.stream)
    for stream in config.streams:
        kinds.setdefault(stream.kind, []).append(stream.name)
    return kinds


def _layout_for(kinds: dict[str, list[str]], config: NodeConfig) -> rrb.Blueprint:
    speech = [e.topic for e in config.engines if e.binding == "speech"]
    action = [e.topic for e in config.engines if e.binding == "action"]
    return blueprint(kinds.get("frame", []), kinds.get("audio", []), kinds.get("joints", []),
                     speech, action)


def view_log(path: str, *, config: NodeConfig | None = None, save: str | None = None,
             connect: str | None = None, duration_s: float | None = None,
             image_stride: int = DEFAULT_IMAGE_STRIDE) -> ViewStats:
    """Log every protocol message of the MCAP log `path` (the first `duration_s` seconds of
    it, by receive time) into Rerun. The mouth box comes from `config`, else the launch
    config stored in the log, else the embedded default."""
    from fusion_node.logs.mcap_format import LogReader

    started = time.monotonic()
    config = config or log_config(path)
    with LogReader(path) as reader:
        kinds = {k: reader.topics([k]) for k in ("frame", "audio", "joints")}
        recording = open_recording(save, connect, None, _layout_for(kinds, config))
        logger = RerunLogger(recording, speech_views(config), image_stride)
        try:
            for message in log_messages(reader, path, duration_s):
                logger.log(message)
        finally:
            recording.flush()
            recording.disconnect()
    logger.stats.wall_s = time.monotonic() - started
    return logger.stats


def view_live(endpoints: Sequence[str], config: NodeConfig, *, save: str | None = None,
              connect: str | None = None, duration_s: float | None = None,
              image_stride: int = DEFAULT_IMAGE_STRIDE,
              stop: threading.Event | None = None) -> ViewStats:
    """Subscribe to `endpoints` and log what arrives until `duration_s` has passed or `stop`
    is set. The viewer only subscribes: PUB sockets drop what it cannot keep up with (seen
    here as `seq_gaps`), so it cannot hold the node back."""
    import zmq

    from fusion_node.transport import Subscriber

    if not endpoints:
        raise ConfigError("view: no endpoint to subscribe to")
    started = time.monotonic()
    recording = open_recording(save, connect, None, _layout_for(_kind_of_topics(config), config))
    logger = RerunLogger(recording, speech_views(config), image_stride)
    context = zmq.Context()
    subscriber = Subscriber(context, endpoints, MonotonicClock(), topics=("",))
    end = None if duration_s is None else started + duration_s
    try:
        while (end is None or time.monotonic() < end) and not (stop and stop.is_set()):
            msg = subscriber.recv(timeout_ms=_RECV_TIMEOUT_MS)
            if msg is not None:
                logger.log(msg)
    finally:
        logger.stats.rejected.update(subscriber.rejected)
        subscriber.close()
        context.term()
        recording.flush()
        recording.disconnect()
    logger.stats.wall_s = time.monotonic() - started
    return logger.stats
