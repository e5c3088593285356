"""Foxglove: the viewer's panels, live from the running node and from a log, one conversion.

Live: with `[view] foxglove = "127.0.0.1:8765"` in the launch file, the node serves a Foxglove
WebSocket while it runs (`fusion_node.view.foxglove_live`, foxglove-sdk: the `foxglove`
extra). In the Foxglove app: Open connection → Foxglove WebSocket → `ws://127.0.0.1:8765`
(from another machine through a tunnel: `ssh -L 8765:127.0.0.1:8765 robot`).

From a log: `fusion-node view LOG.mcap --foxglove OUT.mcap` writes a companion MCAP to open
in Foxglove. A fusion-node log stores protocol messages byte for byte (`fusion-node-parts`
encoding), which Foxglove cannot decode; this decodes them.

Both feed the protocol messages through `FoxgloveTopics` into foxglove-sdk channels (the
live server, or the SDK's MCAP writer), so topics, schemas and fields are the same live and
from files, and one layout, docs/foxglove-layout.json, shows both. Every channel is JSON;
the well-known ones carry Foxglove's JSON schemas (`foxglove.RawImage`, ...), as the log's
own previews do.

Time: every message's log time and `timestamp` is its sensor time (capture time; a
prediction's `t_ref_ns`), the Rerun viewer's timeline too, shown as wall time through a
`fusion_node.clock.WallClockMapping`: measured when the live server starts, or the one the
recorder stored in the log's metadata. The log keeps monotonic time. A log recorded without
one (older logs) exports with its monotonic stamps (time since boot: 1970 dates on
Foxglove's timeline), and the export says so.

Topics (a stream name `a.b` becomes `a_b` where Foxglove message paths split on dots):
  preview/<camera>                     foxglove.RawImage, half resolution, 10 Hz
  preview/<mic>                        foxglove.RawAudio, pcm-s16, every chunk
  /camera/<camera>/mouth_box           foxglove.ImageAnnotations, preview pixel coordinates
  /camera/<camera>/action_chunk        foxglove.ImageAnnotations, the schematic arm
  /mouth/<camera>                      foxglove.CompressedImage, the mouth crop (JPEG)
  /audio/<mic>/level                   {rms, peak} of each chunk, full scale 1
  /joints/<stream>                     {position: {joint: rad}, velocity: {joint: rad/s}}
  /<pred topic>                        fields, posterior by word, targets by joint,
                                       latency_ms, publish_minus_deadline_ms, late,
                                       deadline_misses (cumulative)
  /events                              foxglove.Log: late predictions, command changes
  /health                              {status, problems, deadline_misses: {engine: n}}
                                       from node.health
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from engines.vocabulary import COMMANDS
from fusion_node import __version__
from fusion_node.clock import WallClockMapping
from fusion_node.config import NodeConfig
from fusion_node.errors import LOAD_FAILURES, ReplayError, load_failure
from fusion_node.logs.mcap_format import (
    DEFAULT_PREVIEW_HZ,
    PREVIEW_OF_KEY,
    PREVIEW_PREFIX,
    PREVIEW_STRIDE,
    RAW_AUDIO_SCHEMA,
    RAW_IMAGE_SCHEMA,
    RECORDING_METADATA,
    WALL_CLOCK_KEY,
    LogReader,
    audio_preview,
    image_preview,
    preview_json,
)
from fusion_node.protocol import AudioChunk, Frame, Health, JointState, Message, Prediction
from fusion_node.view.common import (
    LATENCY_NAMES,
    SpeechView,
    arm_points,
    due_step,
    latency_ms,
    log_messages,
    mouth_crop,
    speech_views,
    waveform,
)

if TYPE_CHECKING:
    import foxglove

log = logging.getLogger(__name__)

FOXGLOVE_REMEDY = "install the `foxglove` extra: pip install 'fusion-node[foxglove]'"
EXPORT_METADATA = "fusion_node.foxglove"

_TIME = {"type": "object", "properties": {"sec": {"type": "integer"},
                                          "nsec": {"type": "integer"}}}
_COLOR = {"type": "object", "properties": {c: {"type": "number"} for c in "rgba"}}
_POINT2 = {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}}}
# Foxglove recognises its well-known schemas by name; the properties are its documented
# fields (https://docs.foxglove.dev/docs/visualization/message-schemas).
COMPRESSED_IMAGE_SCHEMA = {
    "title": "foxglove.CompressedImage", "type": "object",
    "properties": {"timestamp": _TIME, "frame_id": {"type": "string"},
                   "data": {"type": "string", "contentEncoding": "base64"},
                   "format": {"type": "string"}}}
IMAGE_ANNOTATIONS_SCHEMA = {
    "title": "foxglove.ImageAnnotations", "type": "object",
    "properties": {
        "circles": {"type": "array", "items": {"type": "object"}},
        "points": {"type": "array", "items": {"type": "object", "properties": {
            "timestamp": _TIME, "type": {"type": "integer"},
            "points": {"type": "array", "items": _POINT2}, "outline_color": _COLOR,
            "outline_colors": {"type": "array", "items": _COLOR}, "fill_color": _COLOR,
            "thickness": {"type": "number"}}}},
        "texts": {"type": "array", "items": {"type": "object", "properties": {
            "timestamp": _TIME, "position": _POINT2, "text": {"type": "string"},
            "font_size": {"type": "number"}, "text_color": _COLOR,
            "background_color": _COLOR}}}}}
LOG_SCHEMA = {
    "title": "foxglove.Log", "type": "object",
    "properties": {"timestamp": _TIME, "level": {"type": "integer"},
                   "message": {"type": "string"}, "name": {"type": "string"},
                   "file": {"type": "string"}, "line": {"type": "integer"}}}
_LINE_LOOP, _LINE_STRIP = 2, 3  # foxglove.PointsAnnotationType
_INFO, _WARNING = 2, 3  # foxglove.LogLevel
_GREEN = {"r": 0.15, "g": 0.8, "b": 0.25, "a": 1.0}
_GREY = {"r": 0.8, "g": 0.8, "b": 0.8, "a": 1.0}
_YELLOW = {"r": 1.0, "g": 0.8, "b": 0.15, "a": 1.0}
_CLEAR = {"r": 0.0, "g": 0.0, "b": 0.0, "a": 0.0}
_BLACK = {"r": 0.0, "g": 0.0, "b": 0.0, "a": 0.6}
_WHITE = {"r": 1.0, "g": 1.0, "b": 1.0, "a": 1.0}
_LATENCY_KEYS = [name.replace("capture→", "capture_to_").replace(" ", "_")
                 for name in LATENCY_NAMES]
_JPEG_QUALITY = 85


def import_foxglove(part: str) -> Any:
    """The foxglove-sdk module, or one ConfigError naming `part` and the extra to install."""
    try:
        import foxglove
    except LOAD_FAILURES as exc:
        raise load_failure(f"{part}: foxglove-sdk", exc, FOXGLOVE_REMEDY) from None
    return foxglove


def topic_name(stream: str) -> str:
    """A stream name as a Foxglove message-path-safe name: `pred.speech` → `pred_speech`."""
    return stream.replace(".", "_")


def _stamp(t_ns: int) -> dict[str, int]:
    t_ns = max(t_ns, 0)
    return {"sec": t_ns // 1_000_000_000, "nsec": t_ns % 1_000_000_000}


def _number(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 6)


class FoxgloveChannels:
    """The JSON channels of one `foxglove.Context`, each made on its first message; the
    context's sink (the SDK's MCAP writer, or its WebSocket server) takes what is logged."""

    def __init__(self, context: foxglove.Context) -> None:
        import foxglove

        self._foxglove = foxglove
        self._context = context
        self._channels: dict[str, foxglove.Channel] = {}
        self.counts: Counter[str] = Counter()

    def wanted(self, topic: str) -> bool:
        """Whether a message on `topic` would reach anyone, so that costly ones are made only
        then: a topic's first message always (it makes the channel the server advertises),
        later ones while a sink (a subscribed client, a file) takes the channel."""
        channel = self._channels.get(topic)
        return channel is None or channel.has_sinks()

    def watched(self) -> bool:
        """Whether any channel has a sink (a subscribed client, a file)."""
        return any(channel.has_sinks() for channel in self._channels.values())

    def declare(self, topic: str, schema: dict[str, Any] | None = None,
                metadata: dict[str, str] | None = None) -> foxglove.Channel:
        """The channel of `topic`, made now if it is new (JSON; without a schema, one that
        names the topic)."""
        channel = self._channels.get(topic)
        if channel is None:
            title = schema["title"] if schema else f"fusion_node.view.{topic.strip('/')}"
            channel = self._channels[topic] = self._foxglove.Channel(
                topic, schema=schema or {"title": title, "type": "object"},
                context=self._context, metadata=metadata)
        return channel

    def log(self, topic: str, log_time_ns: int, body: dict[str, Any] | bytes,
            schema: dict[str, Any] | None = None, metadata: dict[str, str] | None = None) -> None:
        channel = self.declare(topic, schema, metadata)
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        channel.log(data, log_time=min(max(log_time_ns, 0), 2**64 - 1))
        self.counts[topic] += 1

    def close(self) -> None:
        """Unadvertise every channel (the WebSocket server tells its clients)."""
        for channel in self._channels.values():
            channel.close()


class FoxgloveTopics:
    """Protocol messages, in the order they happened, as the Foxglove topics of the module
    docstring, logged on `channels`. Keeps what the topics count across messages (late
    predictions, the last command), so one instance sees one run."""

    def __init__(self, channels: FoxgloveChannels, speech: list[SpeechView], *,
                 wall_clock: WallClockMapping | None,
                 preview_hz: float = DEFAULT_PREVIEW_HZ) -> None:
        self._out = channels
        self._wall: Callable[[int], int] = (
            wall_clock.to_wall_ns if wall_clock is not None else (lambda t_ns: t_ns))
        self._speech_by_topic = {s.topic: s for s in speech}
        self._speech_by_camera = {s.camera: s for s in speech}
        self._preview_period_ns = round(1e9 / preview_hz)
        self._next_preview_ns: dict[str, int] = {}
        self._preview_size: dict[str, tuple[int, int]] = {}  # camera -> preview (w, h)
        self._late: Counter[str] = Counter()
        self._last_command: dict[str, str] = {}

    def declare(self, streams: dict[str, str], *, actions: bool) -> None:
        """Make now the channels that `streams` (name → kind: frame, audio, joints,
        prediction) will fill, and /events and /health; the action chunk's too if `actions`.
        The live server does this before it serves: foxglove-sdk 0.30.3 can answer a client
        that subscribes to a channel made while it is connected with "Unknown channel ID",
        and the client then never gets that topic."""
        out = self._out
        for stream, kind in streams.items():
            name = topic_name(stream)
            if kind == "frame":
                out.declare(PREVIEW_PREFIX + stream, RAW_IMAGE_SCHEMA, {PREVIEW_OF_KEY: stream})
                if stream in self._speech_by_camera:
                    out.declare(f"/mouth/{name}", COMPRESSED_IMAGE_SCHEMA)
                    out.declare(f"/camera/{name}/mouth_box", IMAGE_ANNOTATIONS_SCHEMA)
                if actions:
                    out.declare(f"/camera/{name}/action_chunk", IMAGE_ANNOTATIONS_SCHEMA)
            elif kind == "audio":
                out.declare(PREVIEW_PREFIX + stream, RAW_AUDIO_SCHEMA, {PREVIEW_OF_KEY: stream})
                out.declare(f"/audio/{name}/level")
            elif kind == "joints":
                out.declare(f"/joints/{name}")
            elif kind == "prediction":
                out.declare(f"/{name}")
        out.declare("/events", LOG_SCHEMA)
        out.declare("/health")

    def message(self, msg: Message) -> None:
        if isinstance(msg, Frame):
            self._frame(msg)
        elif isinstance(msg, AudioChunk):
            self._audio(msg)
        elif isinstance(msg, JointState):
            self._out.log(f"/joints/{topic_name(msg.stream)}", self._wall(msg.t_capture_ns), {
                "position": dict(zip(msg.names, map(float, msg.position))),
                "velocity": dict(zip(msg.names, map(float, msg.velocity)))})
        elif isinstance(msg, Prediction):
            self._prediction(msg)
        elif isinstance(msg, Health):
            self._health(msg)

    def _frame(self, frame: Frame) -> None:
        t_ns = self._wall(frame.t_capture_ns)
        due_ns = self._next_preview_ns.get(frame.stream)
        if due_ns is None or frame.t_capture_ns >= due_ns:
            self._next_preview_ns[frame.stream] = frame.t_capture_ns + self._preview_period_ns
            height, width = frame.image.shape[:2]
            self._preview_size[frame.stream] = (-(-width // PREVIEW_STRIDE),
                                                -(-height // PREVIEW_STRIDE))
            topic = PREVIEW_PREFIX + frame.stream
            if self._out.wanted(topic):
                self._out.log(topic, t_ns, preview_json(*image_preview(frame, t_ns)),
                              RAW_IMAGE_SCHEMA, {PREVIEW_OF_KEY: frame.stream})
        speech = self._speech_by_camera.get(frame.stream)
        topic = f"/mouth/{topic_name(frame.stream)}"
        if speech is None or not self._out.wanted(topic):
            return
        crop = mouth_crop(frame.image, speech.mouth_roi)
        if crop is None:
            return
        bgr = crop if frame.encoding == "bgr8" or crop.shape[2] == 1 else crop[..., ::-1]
        ok, jpeg = cv2.imencode(".jpg", np.ascontiguousarray(bgr),
                                [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
        if not ok:
            raise ReplayError(f"{frame.stream}: JPEG encoding of the mouth crop failed")
        self._out.log(topic, t_ns, preview_json(
            {"timestamp": _stamp(t_ns), "frame_id": f"{frame.stream} mouth", "format": "jpeg"},
            jpeg.tobytes()), COMPRESSED_IMAGE_SCHEMA)

    def _audio(self, chunk: AudioChunk) -> None:
        t_ns = self._wall(chunk.t_capture_ns)
        topic = PREVIEW_PREFIX + chunk.stream
        if self._out.wanted(topic):
            self._out.log(topic, t_ns, preview_json(*audio_preview(chunk, t_ns)),
                          RAW_AUDIO_SCHEMA, {PREVIEW_OF_KEY: chunk.stream})
        samples = waveform(chunk)
        self._out.log(f"/audio/{topic_name(chunk.stream)}/level", t_ns, {
            "rms": round(float(np.sqrt(np.mean(samples**2))), 6) if len(samples) else 0.0,
            "peak": round(float(np.max(np.abs(samples))), 6) if len(samples) else 0.0})

    def _health(self, health: Health) -> None:
        engines = health.stats.get("engines")
        if not isinstance(engines, dict):
            return
        self._out.log("/health", self._wall(health.t_capture_ns), {
            "status": health.stats.get("status"), "problems": health.stats.get("problems"),
            "deadline_misses": {name: stats.get("deadline_misses")
                                for name, stats in engines.items() if isinstance(stats, dict)}})

    def _prediction(self, pred: Prediction) -> None:
        t_ns = self._wall(pred.t_ref_ns)
        self._late[pred.stream] += int(pred.late)
        body: dict[str, Any] = {
            "seq": pred.seq, "late": pred.late,
            "deadline_misses": self._late[pred.stream],
            "publish_minus_deadline_ms": round((pred.t_publish_ns - pred.deadline_ns) / 1e6, 6),
            "latency_ms": dict(zip(_LATENCY_KEYS, map(_number, latency_ms(pred)))),
            **{k: v for k, v in pred.fields.items() if not isinstance(v, (list, dict))}}
        if "command_posterior" in pred.arrays:
            posterior = np.asarray(pred.arrays["command_posterior"], np.float64)
            if len(posterior) == len(COMMANDS):
                body["command_posterior"] = dict(zip(COMMANDS, map(float, posterior)))
            self._speech(pred, t_ns)
        if "actions" in pred.arrays and "step_times_ns" in pred.arrays:
            actions = np.asarray(pred.arrays["actions"], np.float64)
            names = pred.fields.get("joint_names")
            if isinstance(names, list) and actions.ndim == 2 and len(names) == actions.shape[1]:
                due = due_step(np.asarray(pred.arrays["step_times_ns"]), pred.deadline_ns)
                body["targets"] = dict(zip(names, map(float, actions[due])))
            self._action(actions, t_ns)
        self._out.log(f"/{topic_name(pred.stream)}", t_ns, body)
        if pred.late:
            self._event(t_ns, _WARNING, pred.stream,
                        f"seq {pred.seq} late: published "
                        f"{(pred.t_publish_ns - pred.deadline_ns) / 1e6:.2f} ms after its deadline")

    def _event(self, t_ns: int, level: int, name: str, text: str) -> None:
        self._out.log("/events", t_ns, {"timestamp": _stamp(t_ns), "level": level,
                                        "message": text, "name": name, "file": "", "line": 0},
                      LOG_SCHEMA)

    def _speech(self, pred: Prediction, t_ns: int) -> None:
        command = pred.fields.get("command")
        if isinstance(command, str) and command != self._last_command.get(pred.stream):
            self._last_command[pred.stream] = command
            self._event(t_ns, _INFO, pred.stream, f"command {command}")
        speech = self._speech_by_topic.get(pred.stream)
        score = pred.fields.get("active_speaker")
        if speech is None or speech.camera not in self._preview_size or not isinstance(
                score, float):
            return
        x, y, w, h = (v / PREVIEW_STRIDE for v in speech.mouth_roi)
        colour = _GREEN if pred.fields.get("speaker_visible_talking") else _GREY
        stamp = _stamp(t_ns)
        self._out.log(f"/camera/{topic_name(speech.camera)}/mouth_box", t_ns, {
            "circles": [],
            "points": [{"timestamp": stamp, "type": _LINE_LOOP,
                        "points": [{"x": x, "y": y}, {"x": x + w, "y": y},
                                   {"x": x + w, "y": y + h}, {"x": x, "y": y + h}],
                        "outline_color": colour, "outline_colors": [], "fill_color": _CLEAR,
                        "thickness": 2}],
            "texts": [{"timestamp": stamp, "position": {"x": x, "y": y + h + 12},
                       "text": f"active speaker {score:.2f}", "font_size": 12,
                       "text_color": _WHITE, "background_color": _BLACK}]},
            IMAGE_ANNOTATIONS_SCHEMA)

    def _action(self, actions: np.ndarray, t_ns: int) -> None:
        if actions.ndim != 2 or len(actions) == 0:
            return
        stamp = _stamp(t_ns)
        for camera, (width, height) in self._preview_size.items():
            topic = f"/camera/{topic_name(camera)}/action_chunk"
            if not self._out.wanted(topic):
                continue
            strips = [(arm_points(actions[0], width, height), _GREY),
                      (arm_points(actions[-1], width, height), _GREEN),
                      (np.stack([arm_points(a, width, height)[-1] for a in actions]), _YELLOW)]
            self._out.log(topic, t_ns, {
                "circles": [], "texts": [],
                "points": [{"timestamp": stamp, "type": _LINE_STRIP,
                            "points": [{"x": float(px), "y": float(py)} for px, py in points],
                            "outline_color": colour, "outline_colors": [],
                            "fill_color": _CLEAR, "thickness": 2}
                           for points, colour in strips]},
                IMAGE_ANNOTATIONS_SCHEMA)


@dataclass
class ExportResult:
    path: str
    counts: Counter[str] = field(default_factory=Counter)
    wall_clock: bool = False  # stamps are wall time (else the log's monotonic time)


def log_wall_clock(path: str, metadata: dict[str, dict[str, str]]) -> WallClockMapping | None:
    """The monotonic↔wall pair the recorder stored in the log `path`, or None (a log from
    before it did, or not from a live recording)."""
    text = metadata.get(RECORDING_METADATA, {}).get(WALL_CLOCK_KEY)
    if text is None:
        return None
    try:
        return WallClockMapping.from_json(text)
    except ValueError as exc:
        raise ReplayError(f"{path}: metadata {RECORDING_METADATA}.{WALL_CLOCK_KEY}: {exc}") \
            from None


def export_foxglove(path: str, out: str, config: NodeConfig) -> ExportResult:
    """Write the Foxglove companion of the complete log `path` to `out` (see the module
    docstring) through foxglove-sdk's MCAP writer; the mouth box comes from `config`."""
    foxglove = import_foxglove("view --foxglove")
    from foxglove.mcap import MCAPCompression, MCAPWriteOptions

    speech = speech_views(config)
    with LogReader(path) as reader:
        wall_clock = log_wall_clock(path, reader.metadata())
        if wall_clock is None:
            log.warning("%s holds no wall clock mapping (recorded before fusion-node stored "
                        "one): the Foxglove export keeps its monotonic stamps, time since "
                        "boot, shown as 1970 dates", path)
        context = foxglove.Context()
        try:
            writer = foxglove.open_mcap(out, allow_overwrite=True, context=context,
                                        writer_options=MCAPWriteOptions(
                                            compression=MCAPCompression.Zstd))
        except Exception as exc:  # noqa: BLE001 - the SDK raises its own untyped errors
            raise ReplayError(f"cannot write {out!r}: {exc}") from None
        channels = FoxgloveChannels(context)
        try:
            writer.write_metadata(EXPORT_METADATA, {
                "source": path, "fusion_node_version": __version__,
                "time": "wall" if wall_clock is not None else "monotonic",
                **({WALL_CLOCK_KEY: wall_clock.to_json()} if wall_clock is not None else {})})
            topics = FoxgloveTopics(channels, speech, wall_clock=wall_clock)
            for msg in log_messages(reader, path):
                topics.message(msg)
        finally:
            writer.close()
    return ExportResult(out, channels.counts, wall_clock is not None)

