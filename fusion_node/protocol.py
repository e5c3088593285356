"""Wire protocol version 1: encode and decode every message fusion-node sends.

A message is a ZeroMQ multipart `[topic, header, payload...]`:
  topic    UTF-8 dotted stream name, equal to the header's `stream`;
  header   a msgpack map (see docs/protocol.md for every field);
  payload  zero or more raw little-endian C-order arrays, described by the header.

`encode` returns buffers for `send_multipart(parts, copy=False)`: large arrays go out
zero-copy, so the caller must not modify an array after handing it over. `decode` validates
everything and raises `ProtocolError` (with a stable `reason`) on any malformed message;
arrays it returns are read-only views of the received buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import msgpack
import numpy as np

from fusion_node.errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
MAX_PAYLOAD_PARTS = 16
MAX_DIMS = 4

# Explicitly little-endian so the wire format does not depend on the host.
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("uint8", "int16", "int32", "int64", "float32", "float64")
}
FRAME_ENCODINGS = {"rgb8": 3, "bgr8": 3, "mono8": 1}
KINDS = ("frame", "audio", "joints", "prediction", "health")

Part = bytes | memoryview
Buffer = Any  # bytes, memoryview or zmq.Frame


@dataclass(slots=True)
class Frame:
    """One camera image, HxWxC uint8, stamped at capture."""

    stream: str
    seq: int
    t_capture_ns: int
    image: np.ndarray
    encoding: str = "rgb8"
    t_receive_ns: int = 0


@dataclass(slots=True)
class AudioChunk:
    """Consecutive audio samples [n, channels]; `t_capture_ns` is the first sample's time.

    `sample_index` counts samples since the stream started, so chunk boundaries are exact
    even when capture stamps jitter.
    """

    stream: str
    seq: int
    t_capture_ns: int
    sample_rate: int
    sample_index: int
    samples: np.ndarray
    t_receive_ns: int = 0

    @property
    def duration_ns(self) -> int:
        return len(self.samples) * 1_000_000_000 // self.sample_rate


@dataclass(slots=True)
class JointState:
    """Joint positions, velocities and efforts in SI units (rad, rad/s, N·m)."""

    stream: str
    seq: int
    t_capture_ns: int
    names: tuple[str, ...]
    position: np.ndarray
    velocity: np.ndarray
    effort: np.ndarray
    t_receive_ns: int = 0


@dataclass(slots=True)
class Prediction:
    """An engine's output for sensor time `t_ref_ns`, due for publication at `deadline_ns`."""

    stream: str
    seq: int
    t_ref_ns: int
    deadline_ns: int
    engine: str
    model_hash: str
    mask: dict[str, bool]
    fields: dict[str, Any]
    arrays: dict[str, np.ndarray]
    trace: dict[str, int]
    late: bool = False
    t_publish_ns: int = 0
    t_receive_ns: int = 0

    @property
    def t_capture_ns(self) -> int:
        return self.t_ref_ns


@dataclass(slots=True)
class Health:
    """Node statistics: rates, drops, latencies, deadline misses."""

    stream: str
    seq: int
    t_capture_ns: int
    stats: dict[str, Any] = field(default_factory=dict)
    t_receive_ns: int = 0


Message = Frame | AudioChunk | JointState | Prediction | Health


def _array_meta(array: np.ndarray) -> tuple[str, list[int]]:
    dtype_name = array.dtype.name
    if dtype_name not in DTYPES:
        raise ProtocolError("bad_dtype", f"cannot send dtype {array.dtype}")
    return dtype_name, list(array.shape)


def _payload(array: np.ndarray) -> memoryview:
    wire = np.ascontiguousarray(array, dtype=DTYPES[array.dtype.name])
    return memoryview(wire).cast("B")


def _pack(header: dict[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def _base(kind: str, stream: str, seq: int, t_capture_ns: int) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "kind": kind, "stream": stream, "seq": seq,
            "t_capture_ns": t_capture_ns}


def encode(msg: Message) -> list[Part]:
    """Encode a message into `[topic, header, payload...]` buffers."""
    topic = msg.stream.encode()
    if isinstance(msg, Frame):
        dtype, shape = _array_meta(msg.image)
        header = _base("frame", msg.stream, msg.seq, msg.t_capture_ns)
        header.update(dtype=dtype, shape=shape, encoding=msg.encoding)
        return [topic, _pack(header), _payload(msg.image)]
    if isinstance(msg, AudioChunk):
        dtype, shape = _array_meta(msg.samples)
        header = _base("audio", msg.stream, msg.seq, msg.t_capture_ns)
        header.update(dtype=dtype, shape=shape, encoding="raw", sample_rate=msg.sample_rate,
                      sample_index=msg.sample_index)
        return [topic, _pack(header), _payload(msg.samples)]
    if isinstance(msg, JointState):
        state = np.stack([msg.position, msg.velocity, msg.effort]).astype("<f8", copy=False)
        header = _base("joints", msg.stream, msg.seq, msg.t_capture_ns)
        header.update(dtype="float64", shape=list(state.shape), encoding="raw",
                      names=list(msg.names))
        return [topic, _pack(header), _payload(state)]
    if isinstance(msg, Prediction):
        header = _base("prediction", msg.stream, msg.seq, msg.t_ref_ns)
        arrays = []
        for name, array in msg.arrays.items():
            dtype, shape = _array_meta(array)
            arrays.append({"name": name, "dtype": dtype, "shape": shape})
        header.update(t_ref_ns=msg.t_ref_ns, deadline_ns=msg.deadline_ns,
                      t_publish_ns=msg.t_publish_ns, late=msg.late, engine=msg.engine,
                      model_hash=msg.model_hash, mask=msg.mask, fields=msg.fields,
                      trace=msg.trace, arrays=arrays, encoding="raw")
        return [topic, _pack(header), *(_payload(a) for a in msg.arrays.values())]
    if isinstance(msg, Health):
        header = _base("health", msg.stream, msg.seq, msg.t_capture_ns)
        header["stats"] = msg.stats
        return [topic, _pack(header)]
    raise TypeError(f"cannot encode {type(msg).__name__}")


def _buffer(part: Buffer) -> memoryview:
    buf = getattr(part, "buffer", None)  # zmq.Frame received with copy=False
    return memoryview(buf if buf is not None else part).cast("B")


def _field(header: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = header.get(name)
    # bool is an int in Python; a flag is never a valid number and vice versa.
    if (value is None or not isinstance(value, kind)
            or (isinstance(value, bool) and kind is int)):
        raise ProtocolError("bad_field", f"header field {name!r} is {value!r}, "
                            f"expected {getattr(kind, '__name__', kind)}")
    return value


def _int_field(header: dict[str, Any], name: str, minimum: int | None = None) -> int:
    value = _field(header, name, int)
    if minimum is not None and value < minimum:
        raise ProtocolError("bad_field", f"header field {name!r} is {value}, below {minimum}")
    if not -(2**63) <= value < 2**63:
        raise ProtocolError("bad_field", f"header field {name!r} is out of int64 range")
    return value


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if (not isinstance(value, list) or not 0 < len(value) <= MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31
                       for d in value)):
        raise ProtocolError("bad_shape", f"{where} shape {value!r} is not a list of 1-"
                            f"{MAX_DIMS} non-negative ints")
    return tuple(value)


def _array(part: Buffer, dtype_name: Any, shape_value: Any, where: str) -> np.ndarray:
    if dtype_name not in DTYPES:
        raise ProtocolError("bad_dtype", f"{where} dtype {dtype_name!r} is not one of "
                            f"{sorted(DTYPES)}")
    dtype = DTYPES[dtype_name]
    shape = _shape(shape_value, where)
    buf = _buffer(part)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if expected > MAX_PAYLOAD_BYTES:
        raise ProtocolError("payload_too_large", f"{where} declares {expected} bytes, "
                            f"limit {MAX_PAYLOAD_BYTES}")
    if buf.nbytes != expected:
        raise ProtocolError("size_mismatch", f"{where} payload is {buf.nbytes} bytes, shape "
                            f"{list(shape)} x {dtype_name} needs {expected}")
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def _unpack_header(part: Buffer) -> dict[str, Any]:
    raw = _buffer(part)
    if raw.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError("header_too_large", f"header is {raw.nbytes} bytes, limit "
                            f"{MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad bytes
        raise ProtocolError("bad_header", f"header is not valid msgpack ({exc})") from None
    if not isinstance(header, dict):
        raise ProtocolError("bad_header", f"header is a {type(header).__name__}, not a map")
    return header


def decode(parts: Sequence[Buffer], t_receive_ns: int = 0) -> Message:
    """Decode and validate one multipart message; raise `ProtocolError` if malformed."""
    if len(parts) < 2:
        raise ProtocolError("truncated", f"{len(parts)} part(s), need topic and header")
    if len(parts) > 2 + MAX_PAYLOAD_PARTS:
        raise ProtocolError("too_many_parts", f"{len(parts)} parts, limit "
                            f"{2 + MAX_PAYLOAD_PARTS}")
    try:
        topic = bytes(_buffer(parts[0])).decode()
    except UnicodeDecodeError:
        raise ProtocolError("bad_topic", "topic is not UTF-8") from None
    header = _unpack_header(parts[1])
    version = header.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError("unsupported_version", f"protocol version {version!r}, this node "
                            f"speaks {PROTOCOL_VERSION}")
    kind = header.get("kind")
    if kind not in KINDS:
        raise ProtocolError("unknown_kind", f"message kind {kind!r} is not one of {KINDS}")
    stream = _field(header, "stream", str)
    if stream != topic:
        raise ProtocolError("bad_topic", f"topic {topic!r} differs from stream {stream!r}")
    seq = _int_field(header, "seq", 0)
    t_capture_ns = _int_field(header, "t_capture_ns")
    payload = parts[2:]
    where = f"{kind} on {stream!r}"

    if kind == "health":
        _expect_parts(payload, 0, where)
        return Health(stream, seq, t_capture_ns, _field(header, "stats", dict), t_receive_ns)
    if kind == "prediction":
        return _decode_prediction(header, stream, seq, payload, where, t_receive_ns)

    _expect_parts(payload, 1, where)
    array = _array(payload[0], header.get("dtype"), header.get("shape"), where)
    if kind == "frame":
        encoding = header.get("encoding")
        if encoding not in FRAME_ENCODINGS:
            raise ProtocolError("bad_field", f"{where} encoding {encoding!r} is not one of "
                                f"{sorted(FRAME_ENCODINGS)}")
        if (array.dtype.name != "uint8" or array.ndim != 3
                or array.shape[2] != FRAME_ENCODINGS[encoding]):
            raise ProtocolError("bad_shape", f"{where} is {array.dtype.name} "
                                f"{list(array.shape)}, {encoding} needs uint8 "
                                f"[H, W, {FRAME_ENCODINGS[encoding]}]")
        return Frame(stream, seq, t_capture_ns, array, encoding, t_receive_ns)
    if kind == "audio":
        if array.dtype.name not in ("int16", "float32") or array.ndim != 2:
            raise ProtocolError("bad_shape", f"{where} is {array.dtype.name} "
                                f"{list(array.shape)}, needs int16 or float32 [n, channels]")
        sample_rate = _int_field(header, "sample_rate", 1)
        sample_index = _int_field(header, "sample_index", 0)
        return AudioChunk(stream, seq, t_capture_ns, sample_rate, sample_index, array,
                          t_receive_ns)
    # joints
    names = header.get("names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ProtocolError("bad_field", f"{where} names {names!r} is not a list of strings")
    if array.dtype.name != "float64" or array.shape != (3, len(names)):
        raise ProtocolError("bad_shape", f"{where} is {array.dtype.name} {list(array.shape)},"
                            f" needs float64 [3, {len(names)}] for {len(names)} names")
    return JointState(stream, seq, t_capture_ns, tuple(names), array[0], array[1], array[2],
                      t_receive_ns)


def _expect_parts(payload: Sequence[Buffer], count: int, where: str) -> None:
    if len(payload) != count:
        raise ProtocolError("truncated" if len(payload) < count else "too_many_parts",
                            f"{where} has {len(payload)} payload part(s), expected {count}")


def _decode_prediction(header: dict[str, Any], stream: str, seq: int,
                       payload: Sequence[Buffer], where: str, t_receive_ns: int) -> Prediction:
    specs = _field(header, "arrays", list)
    _expect_parts(payload, len(specs), where)
    arrays: dict[str, np.ndarray] = {}
    for spec, part in zip(specs, payload):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ProtocolError("bad_field", f"{where} array spec {spec!r} has no name")
        arrays[spec["name"]] = _array(part, spec.get("dtype"), spec.get("shape"),
                                      f"{where} array {spec['name']!r}")
    mask = _field(header, "mask", dict)
    if not all(isinstance(k, str) and isinstance(v, bool) for k, v in mask.items()):
        raise ProtocolError("bad_field", f"{where} mask {mask!r} is not a map of bools")
    trace = _field(header, "trace", dict)
    return Prediction(
        stream=stream, seq=seq,
        t_ref_ns=_int_field(header, "t_ref_ns"),
        deadline_ns=_int_field(header, "deadline_ns"),
        engine=_field(header, "engine", str),
        model_hash=_field(header, "model_hash", str),
        mask=mask, fields=_field(header, "fields", dict), arrays=arrays, trace=trace,
        late=_field(header, "late", bool),
        t_publish_ns=_int_field(header, "t_publish_ns"),
        t_receive_ns=t_receive_ns,
    )
