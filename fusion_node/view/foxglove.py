"""`fusion-node view LOG.mcap --foxglove OUT.mcap`: the viewer's panels for Foxglove.

A fusion-node log stores protocol messages byte for byte (`fusion-node-parts` encoding),
which Foxglove cannot decode; only its previews (`preview/<camera>` as foxglove.RawImage,
`preview/<mic>` as foxglove.RawAudio) show there. This writes a companion MCAP that
docs/foxglove-layout.json displays: the previews copied as they are, plus JSON channels
decoded from the protocol messages. Every message's log time is its sensor time (capture
time; a prediction's `t_ref_ns`), the timeline the Rerun viewer uses too.

Topics (a stream name `a.b` becomes `a_b`: Foxglove message paths split on dots):
  preview/<camera>, preview/<mic>      copied from the log
  /camera/<camera>/mouth_box           foxglove.ImageAnnotations, preview pixel coordinates
  /camera/<camera>/action_chunk        foxglove.ImageAnnotations, the schematic arm
  /mouth/<camera>                      foxglove.CompressedImage, the mouth crop (JPEG)
  /audio/<mic>/level                   {rms, peak} of each chunk, full scale 1
  /joints/<stream>                     {position: {joint: rad}, velocity: {joint: rad/s}}
  /<pred topic>                        fields, posterior by word, targets by joint,
                                       latency_ms, publish_minus_deadline_ms, late,
                                       deadline_misses (cumulative)
  /events                              foxglove.Log: late predictions, command changes
  /health                              {deadline_misses: {engine: n}} from node.health
"""

from __future__ import annotations

import base64
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from mcap.reader import make_reader
from mcap.writer import CompressionType, Writer

from engines.vocabulary import COMMANDS
from fusion_node import __version__
from fusion_node.config import NodeConfig
from fusion_node.errors import ReplayError
from fusion_node.logs.mcap_format import (
    PREVIEW,
    PREVIEW_OF_KEY,
    WINDOW_CUT,
    LogMessage,
    check_magic,
    classify_channel,
    is_complete,
)
from fusion_node.protocol import AudioChunk, Frame, Health, JointState, Message, Prediction
from fusion_node.view.common import (
    LATENCY_NAMES,
    SpeechView,
    arm_points,
    due_step,
    latency_ms,
    speech_views,
    waveform,
)

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


def topic_name(stream: str) -> str:
    """A stream name as a Foxglove message-path-safe name: `pred.speech` → `pred_speech`."""
    return stream.replace(".", "_")


def _stamp(t_ns: int) -> dict[str, int]:
    t_ns = max(t_ns, 0)
    return {"sec": t_ns // 1_000_000_000, "nsec": t_ns % 1_000_000_000}


def _number(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 6)


@dataclass
class ExportResult:
    path: str
    counts: Counter[str] = field(default_factory=Counter)


class _Exporter:
    def __init__(self, writer: Writer, speech: list[SpeechView]) -> None:
        self._writer = writer
        self._speech_by_topic = {s.topic: s for s in speech}
        self._speech_by_camera = {s.camera: s for s in speech}
        self._schemas: dict[str, int] = {}
        self._channels: dict[str, int] = {}
        self._preview_scale: dict[str, tuple[float, int, int]] = {}  # camera -> (scale, w, h)
        self._frame_width: dict[str, int] = {}
        self._late: Counter[str] = Counter()
        self._last_command: dict[str, str] = {}
        self.counts: Counter[str] = Counter()

    def _schema(self, title: str, schema: dict[str, Any] | bytes, encoding: str) -> int:
        if title not in self._schemas:
            data = schema if isinstance(schema, bytes) else json.dumps(schema).encode()
            self._schemas[title] = self._writer.register_schema(title, encoding, data)
        return self._schemas[title]

    def _write(self, topic: str, t_ns: int, body: dict[str, Any],
               schema: dict[str, Any] | None = None) -> None:
        if topic not in self._channels:
            title = schema["title"] if schema else f"fusion_node.view.{topic.strip('/')}"
            schema_id = self._schema(title, schema or {"title": title, "type": "object"},
                                     "jsonschema")
            self._channels[topic] = self._writer.register_channel(topic, "json", schema_id)
        t = min(max(t_ns, 0), 2**64 - 1)
        self._writer.add_message(self._channels[topic], t, json.dumps(body).encode(), t)
        self.counts[topic] += 1

    def copy_preview(self, topic: str, of: str, schema_name: str, schema_data: bytes,
                     message: Any) -> None:
        if topic not in self._channels:
            schema_id = self._schema(schema_name, schema_data, "jsonschema")
            self._channels[topic] = self._writer.register_channel(
                topic, "json", schema_id, {PREVIEW_OF_KEY: of})
        # Sensor time for every message of the export: the recorder's publish_time.
        self._writer.add_message(self._channels[topic], message.publish_time, message.data,
                                 message.publish_time, message.sequence)
        self.counts[topic] += 1
        if schema_name == "foxglove.RawImage" and of not in self._preview_scale:
            preview = json.loads(message.data)
            width = self._frame_width.get(of)
            scale = preview["width"] / width if width else 0.5
            self._preview_scale[of] = (scale, preview["width"], preview["height"])

    def message(self, msg: Message) -> None:
        if isinstance(msg, Frame):
            self._frame(msg)
        elif isinstance(msg, AudioChunk):
            samples = waveform(msg)
            self._write(f"/audio/{topic_name(msg.stream)}/level", msg.t_capture_ns, {
                "rms": round(float(np.sqrt(np.mean(samples**2))), 6) if len(samples) else 0.0,
                "peak": round(float(np.max(np.abs(samples))), 6) if len(samples) else 0.0})
        elif isinstance(msg, JointState):
            self._write(f"/joints/{topic_name(msg.stream)}", msg.t_capture_ns, {
                "position": dict(zip(msg.names, map(float, msg.position))),
                "velocity": dict(zip(msg.names, map(float, msg.velocity)))})
        elif isinstance(msg, Prediction):
            self._prediction(msg)
        elif isinstance(msg, Health):
            engines = msg.stats.get("engines")
            if isinstance(engines, dict):
                self._write("/health", msg.t_capture_ns, {"deadline_misses": {
                    name: stats.get("deadline_misses") for name, stats in engines.items()
                    if isinstance(stats, dict)}})

    def _frame(self, frame: Frame) -> None:
        self._frame_width[frame.stream] = frame.image.shape[1]
        speech = self._speech_by_camera.get(frame.stream)
        if speech is None:
            return
        x, y, w, h = speech.mouth_roi
        crop = frame.image[max(0, y):y + h, max(0, x):x + w]
        if crop.size == 0:
            return
        bgr = crop if frame.encoding == "bgr8" or crop.shape[2] == 1 else crop[..., ::-1]
        ok, jpeg = cv2.imencode(".jpg", np.ascontiguousarray(bgr),
                                [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
        if not ok:
            raise ReplayError(f"{frame.stream}: JPEG encoding of the mouth crop failed")
        self._write(f"/mouth/{topic_name(frame.stream)}", frame.t_capture_ns, {
            "timestamp": _stamp(frame.t_capture_ns), "frame_id": f"{frame.stream} mouth",
            "format": "jpeg", "data": base64.b64encode(jpeg.tobytes()).decode()},
            COMPRESSED_IMAGE_SCHEMA)

    def _prediction(self, pred: Prediction) -> None:
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
            self._speech(pred)
        if "actions" in pred.arrays and "step_times_ns" in pred.arrays:
            actions = np.asarray(pred.arrays["actions"], np.float64)
            names = pred.fields.get("joint_names")
            if isinstance(names, list) and actions.ndim == 2 and len(names) == actions.shape[1]:
                due = due_step(np.asarray(pred.arrays["step_times_ns"]), pred.deadline_ns)
                body["targets"] = dict(zip(names, map(float, actions[due])))
            self._action(pred, actions)
        self._write(f"/{topic_name(pred.stream)}", pred.t_ref_ns, body)
        if pred.late:
            self._event(pred.t_ref_ns, _WARNING, pred.stream,
                        f"seq {pred.seq} late: published "
                        f"{(pred.t_publish_ns - pred.deadline_ns) / 1e6:.2f} ms after its deadline")

    def _event(self, t_ns: int, level: int, name: str, text: str) -> None:
        self._write("/events", t_ns, {"timestamp": _stamp(t_ns), "level": level,
                                      "message": text, "name": name, "file": "", "line": 0},
                    LOG_SCHEMA)

    def _speech(self, pred: Prediction) -> None:
        command = pred.fields.get("command")
        if isinstance(command, str) and command != self._last_command.get(pred.stream):
            self._last_command[pred.stream] = command
            self._event(pred.t_ref_ns, _INFO, pred.stream, f"command {command}")
        speech = self._speech_by_topic.get(pred.stream)
        score = pred.fields.get("active_speaker")
        if speech is None or speech.camera not in self._preview_scale or not isinstance(
                score, float):
            return
        scale = self._preview_scale[speech.camera][0]
        x, y, w, h = (v * scale for v in speech.mouth_roi)
        colour = _GREEN if pred.fields.get("speaker_visible_talking") else _GREY
        stamp = _stamp(pred.t_ref_ns)
        self._write(f"/camera/{topic_name(speech.camera)}/mouth_box", pred.t_ref_ns, {
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

    def _action(self, pred: Prediction, actions: np.ndarray) -> None:
        if actions.ndim != 2 or len(actions) == 0:
            return
        stamp = _stamp(pred.t_ref_ns)
        for camera, (_, width, height) in self._preview_scale.items():
            strips = [(arm_points(actions[0], width, height), _GREY),
                      (arm_points(actions[-1], width, height), _GREEN),
                      (np.stack([arm_points(a, width, height)[-1] for a in actions]), _YELLOW)]
            self._write(f"/camera/{topic_name(camera)}/action_chunk", pred.t_ref_ns, {
                "circles": [], "texts": [],
                "points": [{"timestamp": stamp, "type": _LINE_STRIP,
                            "points": [{"x": float(px), "y": float(py)} for px, py in points],
                            "outline_color": colour, "outline_colors": [],
                            "fill_color": _CLEAR, "thickness": 2}
                           for points, colour in strips]},
                IMAGE_ANNOTATIONS_SCHEMA)


def export_foxglove(path: str, out: str, config: NodeConfig) -> ExportResult:
    """Write the Foxglove companion of the complete log `path` to `out` (see the module
    docstring); the mouth box comes from `config`."""
    check_magic(path)
    if not is_complete(path):
        raise ReplayError(f"{path}: the log is incomplete; run `fusion-node log recover "
                          f"{path} FIXED.mcap` first")
    try:
        sink = open(out, "wb")  # noqa: SIM115 - closed in the finally below
    except OSError as exc:
        raise ReplayError(f"cannot write {out!r}: {exc.strerror}") from None
    try:
        writer = Writer(sink, compression=CompressionType.ZSTD)
        writer.start(library=f"fusion-node {__version__} view --foxglove")
        exporter = _Exporter(writer, speech_views(config))
        with open(path, "rb") as file:
            reader = make_reader(file)
            try:
                for schema, channel, message in reader.iter_messages(log_time_order=True):
                    kind = classify_channel(path, channel, schema).kind
                    if kind == PREVIEW and schema is not None:
                        exporter.copy_preview(channel.topic, channel.metadata[PREVIEW_OF_KEY],
                                              schema.name, schema.data, message)
                    elif kind not in (PREVIEW, WINDOW_CUT):
                        exporter.message(LogMessage(channel.topic, kind, message.log_time,
                                                    message.publish_time,
                                                    message.data).decode(path))
            except ReplayError:
                raise
            except Exception as exc:  # noqa: BLE001 - mcap raises many unrelated types
                raise ReplayError(f"{path}: unreadable data ({exc})") from None
        writer.finish()
    finally:
        sink.close()
    return ExportResult(out, exporter.counts)
