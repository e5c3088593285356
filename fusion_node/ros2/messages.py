"""Protocol messages as ROS 2 messages and back, with rosbags' typestore.

Public API (everything else is private):
  `typestore()`             rosbags' ROS 2 Jazzy typestore with `fusion_node_msgs` registered
                            (shared; treat as read-only). `typestore().serialize_cdr(msg, type)`
                            and `deserialize_cdr(raw, type)` give and take CDR bytes.
  `ros_topic(stream, kind, binding=None) -> RosTopic(name, type)`
                            the ROS 2 topic of a node stream, by one rule:
                              frame  `camera.front` -> `/camera/front/image_raw`   Image
                              audio  `audio.mic0`   -> `/audio/mic0/audio`         AudioChunk
                              joints `joints.arm`   -> `/joints/arm/joint_states`  JointState
                              prediction `pred.speech` -> `/fusion_node/pred/speech`
                              health (`node.health`)   -> `/diagnostics`           DiagnosticArray
                            A prediction's type follows its engine's binding: "speech" ->
                            SpeechPrediction, "action" -> ActionChunk, anything else (or None)
                            -> the generic `fusion_node_msgs/msg/Prediction`.
  `stream_of(topic) -> (stream, kind)`  the inverse of `ros_topic`.
  `to_ros(message, ros_type=None)`      a protocol message as a rosbags message object; a
                            prediction's type is `ros_type` if given, else chosen by its content
                            (`prediction_type`).
  `from_ros(ros_type, msg, stream, *, seq=0, t_receive_ns=0)`  a rosbags message (Image,
                            JointState, AudioChunk, and the node's own outputs) as a protocol
                            message on `stream`. ROS 2 headers carry no sequence number: pass
                            the per-topic count as `seq` (predictions keep theirs in `info`).
Type names: IMAGE, JOINT_STATE, AUDIO, DIAGNOSTICS, SPEECH, ACTION, PREDICTION.

What maps to what: `header.stamp` is the capture time (a prediction's `t_ref_ns`) on the
recording host's monotonic clock, as the node stamps it (`shifted` moves a message to wall
time first, as the live bridge does); `header.frame_id` is the stream name
with `_` for `.` (no TF frame is published). Images are rgb8 / bgr8 / mono8 as the frame's
encoding says; audio is interleaved S16LE or F32LE. A ROS JointState with an empty velocity or
effort array (allowed in ROS: "not measured") becomes NaNs, never zeros. Node health becomes one
DiagnosticStatus `fusion_node` (level from the health status) with each top-level statistic as a
JSON value, plus one status `fusion_node/<group>/<member>` per stream, engine and driver; so
every conversion is lossless apart from seq and receive time, which ROS messages do not carry.
Malformed or unconvertible messages raise `ProtocolError`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from rosbags.typesys.store import Typestore

from fusion_node.errors import ProtocolError
from fusion_node.protocol import (
    DTYPES,
    FRAME_ENCODINGS,
    AudioChunk,
    Frame,
    Health,
    JointState,
    Message,
    Prediction,
)

# Jazzy is the current LTS; the standard messages used here are identical in every ROS 2
# distribution since Foxy, so bags read on any of them.
STORE = Stores.ROS2_JAZZY
MSG_PACKAGE = "fusion_node_msgs"
MSG_DIR = Path(__file__).parent / "msg" / MSG_PACKAGE / "msg"

IMAGE = "sensor_msgs/msg/Image"
JOINT_STATE = "sensor_msgs/msg/JointState"
DIAGNOSTICS = "diagnostic_msgs/msg/DiagnosticArray"
AUDIO = f"{MSG_PACKAGE}/msg/AudioChunk"
SPEECH = f"{MSG_PACKAGE}/msg/SpeechPrediction"
ACTION = f"{MSG_PACKAGE}/msg/ActionChunk"
PREDICTION = f"{MSG_PACKAGE}/msg/Prediction"
PREDICTION_TYPES = (SPEECH, ACTION, PREDICTION)

HEALTH_STREAM = "node.health"
HEALTH_TOPIC = "/diagnostics"  # where ROS 2 diagnostics tools (rqt_robot_monitor) look
NODE_NAMESPACE = "/fusion_node"  # the node's own outputs: predictions
_SENSOR_SUFFIX = {"frame": "image_raw", "audio": "audio", "joints": "joint_states"}
_SENSOR_TYPE = {"frame": IMAGE, "audio": AUDIO, "joints": JOINT_STATE}
_BINDING_TYPE = {"speech": SPEECH, "action": ACTION}
_AUDIO_FORMATS = {"S16LE": "int16", "F32LE": "float32"}
_AUDIO_FORMAT_OF = {dtype: fmt for fmt, dtype in _AUDIO_FORMATS.items()}
# A ROS 2 name token: letters, digits and underscores, not starting with a digit.
_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_SPEECH_FIELDS = {"voice_activity": float, "voice_active": bool, "active_speaker": float,
                  "speaker_visible_talking": bool, "command": str, "command_index": int,
                  "command_confidence": float, "frame_period_ns": int}
_SPEECH_ARRAYS = {"voice_activity": "voice_activity_frames",
                  "active_speaker": "active_speaker_frames",
                  "command_posterior": "command_posterior"}
_ACTION_FIELDS = {"joint_names": list, "horizon": int, "step_period_ns": int}
_HEALTH_NODE = "fusion_node"
_LEVELS = {"ok": 0, "degraded": 1}  # DiagnosticStatus OK, WARN; anything else is ERROR (2)


@dataclass(frozen=True)
class RosTopic:
    name: str
    type: str


@functools.cache
def typestore() -> Typestore:
    """The ROS 2 Jazzy typestore with the `fusion_node_msgs` package registered (cached)."""
    store = get_typestore(STORE)
    types: dict[str, Any] = {}
    for path in sorted(MSG_DIR.glob("*.msg")):
        types.update(get_types_from_msg(path.read_text(), f"{MSG_PACKAGE}/msg/{path.stem}"))
    store.register(types)
    return store


def _tokens(stream: str) -> list[str]:
    tokens = stream.split(".")
    if not all(_TOKEN.fullmatch(t) and "__" not in t for t in tokens):
        raise ProtocolError("bad_topic", f"stream {stream!r} has no ROS 2 topic name: each "
                            "dot-separated part must be letters, digits and single underscores, "
                            "not starting with a digit")
    return tokens


def ros_topic(stream: str, kind: str, binding: str | None = None) -> RosTopic:
    """The ROS 2 topic name and message type of node stream `stream` of protocol `kind`."""
    if kind == "health":
        return RosTopic(HEALTH_TOPIC, DIAGNOSTICS)
    tokens = _tokens(stream)
    if kind == "prediction":
        return RosTopic("/".join((NODE_NAMESPACE, *tokens)),
                        _BINDING_TYPE.get(binding or "", PREDICTION))
    if kind not in _SENSOR_SUFFIX:
        raise ProtocolError("unknown_kind", f"stream {stream!r} has kind {kind!r}, not one of "
                            f"{sorted([*_SENSOR_SUFFIX, 'prediction', 'health'])}")
    return RosTopic("/" + "/".join((*tokens, _SENSOR_SUFFIX[kind])), _SENSOR_TYPE[kind])


def stream_of(topic: str) -> tuple[str, str]:
    """The node stream and protocol kind a ROS 2 topic named by `ros_topic` carries."""
    if topic == HEALTH_TOPIC:
        return HEALTH_STREAM, "health"
    tokens = topic.split("/")
    if topic.startswith(NODE_NAMESPACE + "/") and len(tokens) > 2:
        return ".".join(tokens[2:]), "prediction"
    for kind, suffix in _SENSOR_SUFFIX.items():
        if len(tokens) > 2 and tokens[0] == "" and tokens[-1] == suffix:
            return ".".join(tokens[1:-1]), kind
    raise ProtocolError("bad_topic", f"ROS 2 topic {topic!r} is not one fusion-node names "
                        f"(/<stream parts>/{{{','.join(_SENSOR_SUFFIX.values())}}}, "
                        f"{NODE_NAMESPACE}/<stream parts> or {HEALTH_TOPIC})")


# -- protocol -> ROS 2 -----------------------------------------------------------------------

def _header(t_ns: int, stream: str) -> Any:
    types = typestore().types
    sec, nanosec = divmod(t_ns, 1_000_000_000)
    if not -(2**31) <= sec < 2**31:
        raise ProtocolError("bad_field", f"{stream!r}: time {t_ns} ns does not fit a ROS 2 "
                            "stamp (int32 seconds)")
    return types["std_msgs/msg/Header"](types["builtin_interfaces/msg/Time"](sec, nanosec),
                                        stream.replace(".", "_"))


def _bytes(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return np.frombuffer(np.ascontiguousarray(array, dtype=dtype).tobytes(), np.uint8)


def _fits(prediction: Prediction, fields: dict[str, type], arrays: set[str]) -> bool:
    return (prediction.fields.keys() == fields.keys() and prediction.arrays.keys() == arrays
            and all(type(prediction.fields[k]) is t for k, t in fields.items()))


def prediction_type(prediction: Prediction) -> str:
    """The most specific message type that holds `prediction` without loss."""
    arrays = prediction.arrays
    if (_fits(prediction, _SPEECH_FIELDS, set(_SPEECH_ARRAYS))
            and all(arrays[a].dtype == np.float32 and arrays[a].ndim == 1
                    for a in _SPEECH_ARRAYS)):
        return SPEECH
    if _fits(prediction, _ACTION_FIELDS, {"actions", "step_times_ns"}):
        names, steps, actions = (prediction.fields["joint_names"], arrays["step_times_ns"],
                                 arrays["actions"])
        if (all(type(n) is str for n in names) and steps.dtype == np.int64 and steps.ndim == 1
                and actions.dtype == np.float32
                and actions.shape == (len(steps), len(names))
                and prediction.fields["horizon"] == len(steps)):
            return ACTION
    return PREDICTION


def _info(prediction: Prediction) -> Any:
    trace = prediction.trace
    if not all(type(k) is str and type(v) is int for k, v in trace.items()):
        raise ProtocolError("bad_field", f"prediction on {prediction.stream!r}: trace "
                            f"{trace!r} is not a map of int times")
    return typestore().types[f"{MSG_PACKAGE}/msg/PredictionInfo"](
        t_ref_ns=prediction.t_ref_ns, deadline_ns=prediction.deadline_ns,
        latency_ns=prediction.deadline_ns - prediction.t_ref_ns,
        t_publish_ns=prediction.t_publish_ns, late=prediction.late, seq=prediction.seq,
        engine=prediction.engine, model_hash=prediction.model_hash,
        mask_streams=list(prediction.mask), mask_present=np.array(list(prediction.mask.values()),
                                                                  dtype=np.bool_),
        trace_names=list(trace), trace_ns=np.array(list(trace.values()), dtype=np.int64))


def _prediction_to_ros(prediction: Prediction, ros_type: str) -> Any:
    types = typestore().types
    header, info = _header(prediction.t_ref_ns, prediction.stream), _info(prediction)
    fields, arrays = prediction.fields, prediction.arrays
    if ros_type in (SPEECH, ACTION) and prediction_type(prediction) != ros_type:
        raise ProtocolError("bad_field", f"prediction on {prediction.stream!r} (fields "
                            f"{sorted(fields)}, arrays {sorted(arrays)}) does not fit "
                            f"{ros_type}; publish it as {PREDICTION}")
    if ros_type == SPEECH:
        return types[SPEECH](header=header, info=info, **fields, **{
            name: np.array(arrays[key], dtype=np.float32) for key, name in _SPEECH_ARRAYS.items()})
    if ros_type == ACTION:
        return types[ACTION](
            header=header, info=info, joint_names=list(fields["joint_names"]),
            horizon=fields["horizon"], step_period_ns=fields["step_period_ns"],
            step_times_ns=np.array(arrays["step_times_ns"], dtype=np.int64),
            actions=np.array(arrays["actions"], dtype=np.float32).reshape(-1))
    if ros_type != PREDICTION:
        raise ProtocolError("bad_field", f"prediction on {prediction.stream!r}: {ros_type!r} is "
                            f"not a prediction type ({', '.join(PREDICTION_TYPES)})")
    try:
        fields_json = json.dumps(fields, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ProtocolError("bad_field", f"prediction on {prediction.stream!r}: fields are not "
                            f"JSON ({exc})") from None
    named = types[f"{MSG_PACKAGE}/msg/NamedArray"]
    return types[PREDICTION](header=header, info=info, fields_json=fields_json, arrays=[
        named(name=name, dtype=array.dtype.name, shape=np.array(array.shape, dtype=np.uint32),
              data=_bytes(array, DTYPES[array.dtype.name]))
        for name, array in arrays.items()])


def _health_to_ros(health: Health) -> Any:
    types = typestore().types
    status = types["diagnostic_msgs/msg/DiagnosticStatus"]
    key_value = types["diagnostic_msgs/msg/KeyValue"]
    top: list[Any] = []
    members: list[Any] = []
    try:
        for key, value in health.stats.items():
            # A non-empty map of maps (streams, engines, drivers): one status per member, so
            # ROS 2 monitors list each stream and engine on its own line.
            if (isinstance(value, dict) and value
                    and all(isinstance(v, dict) for v in value.values())):
                for member, stats in value.items():
                    members.append(status(
                        level=0, name=f"{_HEALTH_NODE}/{key}/{member}", message="",
                        hardware_id="", values=[key_value(k, json.dumps(v))
                                                for k, v in stats.items()]))
            else:
                top.append(key_value(key, json.dumps(value)))
    except (TypeError, ValueError) as exc:
        raise ProtocolError("bad_field", f"health on {health.stream!r}: stats are not JSON "
                            f"({exc})") from None
    state = health.stats.get("status", "")
    problems = health.stats.get("problems") or []
    message = "; ".join(map(str, problems)) if isinstance(problems, list) else str(problems)
    return types[DIAGNOSTICS](header=_header(health.t_capture_ns, health.stream), status=[
        status(level=_LEVELS.get(str(state), 2), name=_HEALTH_NODE,
               message=message or str(state), hardware_id="", values=top), *members])


def shifted(message: Message, offset_ns: int) -> Message:
    """A copy of `message` with every instant in it moved by `offset_ns` (durations unchanged).
    The live bridge publishes in wall time this way, as ROS 2 tools expect of stamps (tf,
    message_filters and rviz compare them with ROS time); logs and bags keep the node's
    monotonic time."""
    if isinstance(message, Prediction):
        return dataclasses.replace(
            message, t_ref_ns=message.t_ref_ns + offset_ns,
            deadline_ns=message.deadline_ns + offset_ns,
            t_publish_ns=message.t_publish_ns + offset_ns if message.t_publish_ns else 0,
            t_receive_ns=message.t_receive_ns + offset_ns if message.t_receive_ns else 0,
            trace={k: v + offset_ns if k.startswith("t_") and v else v
                   for k, v in message.trace.items()})
    return dataclasses.replace(
        message, t_capture_ns=message.t_capture_ns + offset_ns,
        t_receive_ns=message.t_receive_ns + offset_ns if message.t_receive_ns else 0)


def to_ros(message: Message, ros_type: str | None = None) -> Any:
    """`message` as a rosbags message object of `ros_type` (default: `ros_topic`'s type for a
    sensor or health message, `prediction_type` for a prediction)."""
    if isinstance(message, Prediction):
        return _prediction_to_ros(message, ros_type or prediction_type(message))
    types = typestore().types
    if isinstance(message, Health):
        return _health_to_ros(message)
    header = _header(message.t_capture_ns, message.stream)
    if isinstance(message, Frame):
        image = message.image
        height, width, channels = image.shape
        return types[IMAGE](header=header, height=height, width=width,
                            encoding=message.encoding, is_bigendian=0, step=width * channels,
                            data=_bytes(image, np.dtype(np.uint8)))
    if isinstance(message, AudioChunk):
        samples = message.samples
        fmt = _AUDIO_FORMAT_OF.get(samples.dtype.name)
        if fmt is None or samples.ndim != 2:
            raise ProtocolError("bad_dtype", f"audio on {message.stream!r} is "
                                f"{samples.dtype} {list(samples.shape)}, needs int16 or "
                                "float32 [n, channels]")
        return types[AUDIO](header=header, sample_rate=message.sample_rate,
                            channels=samples.shape[1], sample_index=message.sample_index,
                            format=fmt, data=_bytes(samples, DTYPES[samples.dtype.name]))
    if isinstance(message, JointState):
        return types[JOINT_STATE](
            header=header, name=list(message.names),
            position=np.array(message.position, dtype=np.float64),
            velocity=np.array(message.velocity, dtype=np.float64),
            effort=np.array(message.effort, dtype=np.float64))
    raise TypeError(f"cannot convert {type(message).__name__} to ROS 2")


# -- ROS 2 -> protocol -----------------------------------------------------------------------

def _stamp_ns(msg: Any) -> int:
    stamp = msg.header.stamp
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _image(msg: Any, stream: str) -> np.ndarray:
    where = f"{IMAGE} for {stream!r}"
    channels = FRAME_ENCODINGS.get(msg.encoding)
    if channels is None:
        raise ProtocolError("bad_field", f"{where}: encoding {msg.encoding!r} is not one of "
                            f"{sorted(FRAME_ENCODINGS)}")
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    data = np.asarray(msg.data, dtype=np.uint8)
    if step < width * channels or data.size != step * height or height == 0 or width == 0:
        raise ProtocolError("size_mismatch", f"{where}: {data.size} bytes, step {step} for "
                            f"{height}x{width} {msg.encoding} (needs step >= "
                            f"{width * channels} and step x height bytes)")
    # Rows may be padded to `step` bytes; the protocol's frames are packed.
    return data.reshape(height, step)[:, :width * channels].reshape(height, width, channels)


def _joint_array(values: Any, count: int, name: str, stream: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0 and count:
        return np.full(count, np.nan)  # ROS: empty means not measured; never invent zeros
    if array.shape != (count,):
        raise ProtocolError("bad_shape", f"{JOINT_STATE} for {stream!r}: {name} has "
                            f"{array.size} values for {count} joint names")
    return array


def _prediction_from_ros(ros_type: str, msg: Any, stream: str, t_receive_ns: int) -> Prediction:
    info = msg.info
    where = f"{ros_type} for {stream!r}"
    if len(info.mask_streams) != len(info.mask_present) or len(info.trace_names) != len(
            info.trace_ns):
        raise ProtocolError("bad_field", f"{where}: mask or trace names and values differ in "
                            "length")
    fields: dict[str, Any]
    arrays: dict[str, np.ndarray]
    if ros_type == SPEECH:
        fields = {name: kind(getattr(msg, name)) for name, kind in _SPEECH_FIELDS.items()}
        arrays = {key: np.asarray(getattr(msg, name), dtype=np.float32)
                  for key, name in _SPEECH_ARRAYS.items()}
    elif ros_type == ACTION:
        names = list(msg.joint_names)
        steps = np.asarray(msg.step_times_ns, dtype=np.int64)
        actions = np.asarray(msg.actions, dtype=np.float32)
        if actions.size != steps.size * len(names):
            raise ProtocolError("bad_shape", f"{where}: {actions.size} actions for "
                                f"{steps.size} steps x {len(names)} joints")
        fields = {"joint_names": names, "horizon": int(msg.horizon),
                  "step_period_ns": int(msg.step_period_ns)}
        arrays = {"actions": actions.reshape(steps.size, len(names)), "step_times_ns": steps}
    else:
        try:
            fields = json.loads(msg.fields_json)
        except ValueError as exc:
            raise ProtocolError("bad_field", f"{where}: fields_json is not JSON ({exc})") from None
        if type(fields) is not dict:
            raise ProtocolError("bad_field", f"{where}: fields_json is not a JSON object")
        arrays = {}
        for item in msg.arrays:
            dtype = DTYPES.get(item.dtype)
            shape = tuple(int(d) for d in item.shape)
            data = np.asarray(item.data, dtype=np.uint8)
            if dtype is None or data.size != math.prod(shape) * dtype.itemsize:
                raise ProtocolError("size_mismatch", f"{where}: array {item.name!r} is "
                                    f"{data.size} bytes of {item.dtype!r}, shape {list(shape)}")
            arrays[item.name] = np.frombuffer(data.tobytes(), dtype).reshape(shape)
    return Prediction(
        stream=stream, seq=int(info.seq), t_ref_ns=int(info.t_ref_ns),
        deadline_ns=int(info.deadline_ns), engine=info.engine, model_hash=info.model_hash,
        mask={s: bool(p) for s, p in zip(info.mask_streams, info.mask_present)},
        fields=fields, arrays=arrays,
        trace={n: int(t) for n, t in zip(info.trace_names, info.trace_ns)},
        late=bool(info.late), t_publish_ns=int(info.t_publish_ns), t_receive_ns=t_receive_ns)


def _health_from_ros(msg: Any, stream: str, seq: int, t_receive_ns: int) -> Health:
    stats: dict[str, Any] = {}
    prefix = _HEALTH_NODE + "/"
    try:
        for status in msg.status:
            values = {kv.key: json.loads(kv.value) for kv in status.values}
            if status.name == _HEALTH_NODE:
                stats.update(values)
            elif status.name.startswith(prefix) and "/" in status.name[len(prefix):]:
                group, member = status.name[len(prefix):].split("/", 1)
                stats.setdefault(group, {})[member] = values
    except ValueError as exc:
        raise ProtocolError("bad_field", f"{DIAGNOSTICS} for {stream!r}: a value is not "
                            f"JSON ({exc}); not fusion-node health") from None
    return Health(stream, seq, _stamp_ns(msg), stats, t_receive_ns)


def from_ros(ros_type: str, msg: Any, stream: str, *, seq: int = 0,
             t_receive_ns: int = 0) -> Message:
    """The protocol message on `stream` that rosbags message `msg` of `ros_type` holds; its
    capture time is the header stamp. ProtocolError if it cannot be one."""
    if ros_type == IMAGE:
        return Frame(stream, seq, _stamp_ns(msg), _image(msg, stream), msg.encoding,
                     t_receive_ns)
    if ros_type == AUDIO:
        dtype_name = _AUDIO_FORMATS.get(msg.format)
        if dtype_name is None:
            raise ProtocolError("bad_dtype", f"{AUDIO} for {stream!r}: format {msg.format!r} is "
                                f"not one of {sorted(_AUDIO_FORMATS)}")
        dtype, channels, data = DTYPES[dtype_name], int(msg.channels), np.asarray(msg.data)
        if channels < 1 or msg.sample_rate < 1 or data.size % (channels * dtype.itemsize):
            raise ProtocolError("size_mismatch", f"{AUDIO} for {stream!r}: {data.size} bytes "
                                f"of {msg.format} in {channels} channel(s) at "
                                f"{msg.sample_rate} Hz")
        samples = np.frombuffer(data.astype(np.uint8).tobytes(), dtype).reshape(-1, channels)
        return AudioChunk(stream, seq, _stamp_ns(msg), int(msg.sample_rate),
                          int(msg.sample_index), samples, t_receive_ns)
    if ros_type == JOINT_STATE:
        names = tuple(msg.name)
        position, velocity, effort = (_joint_array(getattr(msg, f), len(names), f, stream)
                                      for f in ("position", "velocity", "effort"))
        return JointState(stream, seq, _stamp_ns(msg), names, position, velocity, effort,
                          t_receive_ns)
    if ros_type in PREDICTION_TYPES:
        return _prediction_from_ros(ros_type, msg, stream, t_receive_ns)
    if ros_type == DIAGNOSTICS:
        return _health_from_ros(msg, stream, seq, t_receive_ns)
    known = (IMAGE, AUDIO, JOINT_STATE, DIAGNOSTICS, *PREDICTION_TYPES)
    raise ProtocolError("unknown_kind", f"ROS 2 type {ros_type!r} on {stream!r} is not one "
                        f"fusion-node reads ({', '.join(known)})")
