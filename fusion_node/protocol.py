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

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from fusion_node.errors import ProtocolError
from fusion_node.shm import ShmReader, shm_entry, shm_entry_prefix, shm_ints

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


# A seq step larger than this is the sender restarting, not lost messages: 2^20 is over 8
# minutes of a 2 kHz stream.
SEQ_JUMP = 1 << 20


@dataclass(slots=True)
class SeqCounter:
    """Messages lost upstream, read from one stream's `seq` (one more per message). A step
    back, or forward by more than SEQ_JUMP, is the sender restarting (a respawned driver
    counts from 0 again); the same seq again is a repeat and counts nothing."""

    first: int = -1
    last: int = -1
    gaps: int = 0
    restarts: int = 0

    def note(self, seq: int) -> None:
        step = seq - self.last
        if self.last < 0:
            self.first = seq
        elif step < 0 or step > SEQ_JUMP:
            self.restarts += 1
        elif step > 1:
            self.gaps += step - 1
        self.last = seq


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


# `dtype.name` builds a new string on every call (~6 µs in numpy 2, more when cold); the
# cached `dtype.str` of either byte order maps to the wire name in a dict lookup.
_WIRE_NAMES: dict[str, str] = {
    dt.newbyteorder(order).str: name for name, dt in DTYPES.items() for order in "<>"
}


def _pack(header: dict[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


# Packing a whole header map costs ~3 µs, and 15 µs or more in a thread that has just woken
# up, which is when a driver sends. Within one stream only the counter and the times change,
# so the constant fields are packed once per layout and the changing ones are appended as
# msgpack int64 (0xd3, then 8 bytes big-endian): msgpack decoders accept any integer width.
_SEQ_KEY = b"\xa3seq\xd3"  # fixstr "seq", then the int64 marker
_T_CAPTURE_KEY = b"\xact_capture_ns\xd3"
_SAMPLE_INDEX_KEY = b"\xacsample_index\xd3"
_SEQ_T = struct.Struct(">5sq14sq")  # frame, joints: seq, t_capture_ns
_SEQ_T_INDEX = struct.Struct(">5sq14sq14sq")  # audio: seq, t_capture_ns, sample_index
_MAX_LAYOUTS = 1024  # audio chunks of varying length make new layouts; keep caches bounded
# The builtin float64 descriptor, identical to '<f8' only on a little-endian host; on any
# other host the identity test in encode fails and the general path converts.
_F64 = np.dtype("<f8")


@dataclass(frozen=True, slots=True)
class _Layout:
    """Everything constant in one stream's frame, audio or joints header, packed once."""

    kind: str
    stream: str
    topic: bytes
    dtype: np.dtype
    shape: tuple[int, ...]
    nbytes: int
    extra: Any  # frame: encoding; audio: sample_rate; joints: names
    prefix: bytes  # msgpack map header and the constant key/value pairs
    suffix: struct.Struct  # the varying int64 fields that follow


_LAYOUTS: dict[tuple[Any, ...], _Layout] = {}


def _layout(kind: str, stream: str, dtype_name: str, shape: tuple[int, ...],
            extra: Any) -> _Layout:
    key = (kind, stream, dtype_name, shape, extra)
    layout = _LAYOUTS.get(key)
    if layout is not None:
        return layout
    constant = {"v": PROTOCOL_VERSION, "kind": kind, "stream": stream, "dtype": dtype_name,
                "shape": list(shape)}
    if kind == "frame":
        constant["encoding"] = extra
    elif kind == "audio":
        constant.update(encoding="raw", sample_rate=extra)
    else:
        constant.update(encoding="raw", names=list(extra))
    suffix, varying = (_SEQ_T_INDEX, 3) if kind == "audio" else (_SEQ_T, 2)
    packer = msgpack.Packer(use_bin_type=True)
    prefix = packer.pack_map_header(len(constant) + varying) + b"".join(
        packer.pack(k) + packer.pack(v) for k, v in constant.items())
    dtype = DTYPES[dtype_name]
    layout = _Layout(kind, stream, stream.encode(), dtype, shape,
                     math.prod(shape) * dtype.itemsize, extra, prefix, suffix)
    if len(_LAYOUTS) >= _MAX_LAYOUTS:
        _LAYOUTS.clear()
    _LAYOUTS[key] = layout
    return layout


def _header(layout: _Layout, seq: int, t_capture_ns: int, sample_index: int = 0) -> bytes:
    try:
        if layout.suffix is _SEQ_T:
            return layout.prefix + _SEQ_T.pack(_SEQ_KEY, seq, _T_CAPTURE_KEY, t_capture_ns)
        return layout.prefix + _SEQ_T_INDEX.pack(_SEQ_KEY, seq, _T_CAPTURE_KEY, t_capture_ns,
                                                 _SAMPLE_INDEX_KEY, sample_index)
    except struct.error as exc:
        raise ProtocolError("bad_field", f"{layout.kind} on {layout.stream!r}: seq, "
                            f"t_capture_ns and sample_index must be int64 ({exc})") from None


def _wire_name(array: np.ndarray) -> str:
    dtype_name = _WIRE_NAMES.get(array.dtype.str)
    if dtype_name is None:
        raise ProtocolError("bad_dtype", f"cannot send dtype {array.dtype}")
    return dtype_name


def _wire(array: np.ndarray, dtype: np.dtype) -> memoryview:
    wire = np.ascontiguousarray(array, dtype=dtype)
    if wire.size == 0:  # memoryview.cast refuses shapes with a zero in them
        return memoryview(b"")
    return memoryview(wire).cast("B")


def encode(msg: Message) -> list[Part]:
    """Encode a message into `[topic, header, payload...]` buffers."""
    if isinstance(msg, Frame):
        image = msg.image
        layout = _layout("frame", msg.stream, _wire_name(image), image.shape, msg.encoding)
        return [layout.topic, _header(layout, msg.seq, msg.t_capture_ns),
                _wire(image, layout.dtype)]
    if isinstance(msg, AudioChunk):
        samples = msg.samples
        layout = _layout("audio", msg.stream, _wire_name(samples), samples.shape,
                         msg.sample_rate)
        return [layout.topic, _header(layout, msg.seq, msg.t_capture_ns, msg.sample_index),
                _wire(samples, layout.dtype)]
    if isinstance(msg, JointState):
        position, velocity, effort = msg.position, msg.velocity, msg.effort
        if (type(position) is np.ndarray and type(velocity) is np.ndarray
                and type(effort) is np.ndarray and position.dtype is _F64
                and velocity.dtype is _F64 and effort.dtype is _F64 and position.ndim == 1
                and position.shape == velocity.shape == effort.shape):
            # Three row copies: about half the time of np.array's generic row discovery.
            payload: Part = position.tobytes() + velocity.tobytes() + effort.tobytes()
            shape = (3, len(position))
        else:  # converts the dtype; refuses ragged rows
            state = np.array((position, velocity, effort), dtype="<f8")
            payload, shape = _wire(state, state.dtype), state.shape
        layout = _layout("joints", msg.stream, "float64", shape, tuple(msg.names))
        return [layout.topic, _header(layout, msg.seq, msg.t_capture_ns), payload]
    if isinstance(msg, Prediction):
        specs = []
        arrays: list[Part] = []
        for name, array in msg.arrays.items():
            dtype_name = _wire_name(array)
            specs.append({"name": name, "dtype": dtype_name, "shape": list(array.shape)})
            arrays.append(_wire(array, DTYPES[dtype_name]))
        header = {"v": PROTOCOL_VERSION, "kind": "prediction", "stream": msg.stream,
                  "seq": msg.seq, "t_capture_ns": msg.t_ref_ns, "t_ref_ns": msg.t_ref_ns,
                  "deadline_ns": msg.deadline_ns, "t_publish_ns": msg.t_publish_ns,
                  "late": msg.late, "engine": msg.engine, "model_hash": msg.model_hash,
                  "mask": msg.mask, "fields": msg.fields, "trace": msg.trace,
                  "arrays": specs, "encoding": "raw"}
        return [msg.stream.encode(), _pack(header), *arrays]
    if isinstance(msg, Health):
        header = {"v": PROTOCOL_VERSION, "kind": "health", "stream": msg.stream,
                  "seq": msg.seq, "t_capture_ns": msg.t_capture_ns, "stats": msg.stats}
        return [msg.stream.encode(), _pack(header)]
    raise TypeError(f"cannot encode {type(msg).__name__}")


def _view(part: Buffer) -> memoryview:
    """The part's bytes as a flat memoryview, without copying."""
    view = getattr(part, "buffer", None)  # zmq.Frame received with copy=False: flat bytes
    if view is not None:
        return view
    view = memoryview(part)
    return view if view.ndim == 1 and view.format == "B" else view.cast("B")


def _where(kind: str, stream: str, name: str | None = None) -> str:
    # Built only when raising: decode runs in a freshly woken thread, where every step counts.
    return f"{kind} on {stream!r}" + (f" array {name!r}" if name is not None else "")


def _field(header: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = header.get(name)
    # bool is an int in Python; a flag is never a valid number and vice versa.
    if (value is None or not isinstance(value, kind)
            or (isinstance(value, bool) and kind is int)):
        raise ProtocolError("bad_field", f"header field {name!r} is {value!r}, "
                            f"expected {getattr(kind, '__name__', kind)}")
    return value


def _int_field(header: dict[str, Any], name: str, minimum: int | None = None) -> int:
    value = header.get(name)
    # An exact type test: bool is an int subclass in Python, but a flag is never a number.
    if type(value) is not int:
        raise ProtocolError("bad_field", f"header field {name!r} is {value!r}, expected int")
    if minimum is not None and value < minimum:
        raise ProtocolError("bad_field", f"header field {name!r} is {value}, below {minimum}")
    if not -(2**63) <= value < 2**63:
        raise ProtocolError("bad_field", f"header field {name!r} is out of int64 range")
    return value


def _array(part: Buffer, dtype_name: Any, shape: Any, kind: str, stream: str,
           name: str | None = None) -> np.ndarray:
    """A read-only view of one payload part, checked against its declared dtype and shape."""
    # Test the type first: an unhashable value (a list, a map) must not reach the dict lookup.
    dtype = DTYPES.get(dtype_name) if type(dtype_name) is str else None
    if dtype is None:
        raise ProtocolError("bad_dtype", f"{_where(kind, stream, name)} dtype {dtype_name!r} "
                            f"is not one of {sorted(DTYPES)}")
    if type(shape) is not list or not 0 < len(shape) <= MAX_DIMS or not all(
            type(dim) is int and 0 <= dim < 2**31 for dim in shape):
        raise ProtocolError("bad_shape", f"{_where(kind, stream, name)} shape {shape!r} is not "
                            f"a list of 1-{MAX_DIMS} non-negative ints")
    # Python ints cannot overflow (np.prod in int64 wraps, e.g. 65536**4 to 0).
    expected = math.prod(shape) * dtype.itemsize
    if expected > MAX_PAYLOAD_BYTES:
        raise ProtocolError("payload_too_large", f"{_where(kind, stream, name)} declares "
                            f"{expected} bytes, limit {MAX_PAYLOAD_BYTES}")
    buf = _view(part)
    if buf.nbytes != expected:
        raise ProtocolError("size_mismatch", f"{_where(kind, stream, name)} payload is "
                            f"{buf.nbytes} bytes, shape {shape} x {dtype_name} needs {expected}")
    # Received zmq.Frame buffers are writable; a view shared by several consumers must not be
    # changed in place by one of them. np.ndarray(buffer=) is one call: the cheapest view.
    return np.ndarray(shape, dtype, buf.toreadonly())


def _refuse_ext(code: int, data: bytes) -> Any:
    # The protocol has no extension types; one is a malformed (or hostile) header.
    raise ValueError(f"extension type {code} is not allowed")


def _unpack_header(part: Buffer) -> dict[str, Any]:
    raw = _view(part)
    if raw.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError("header_too_large", f"header is {raw.nbytes} bytes, limit "
                            f"{MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types
        raise ProtocolError("bad_header", f"header is not valid msgpack ({exc})") from None
    if type(header) is not dict:
        raise ProtocolError("bad_header", f"header is a {type(header).__name__}, not a map")
    return header


def decode(parts: Sequence[Buffer], t_receive_ns: int = 0,
           shm: ShmReader | None = None) -> Message:
    """Decode and validate one multipart message; raise `ProtocolError` if malformed.

    A frame, audio or joints message without payload whose header has an `shm` map carries
    its array in shared memory (docs/protocol.md §10): it is resolved through `shm`, and
    refused (`shm_unsupported`) without one. The array is then a view into the publisher's
    ring, valid until `shm.last_lease.expires_ns`."""
    if len(parts) < 2:
        raise ProtocolError("truncated", f"{len(parts)} part(s), need topic and header")
    if len(parts) > 2 + MAX_PAYLOAD_PARTS:
        raise ProtocolError("too_many_parts", f"{len(parts)} parts, limit "
                            f"{2 + MAX_PAYLOAD_PARTS}")
    raw_topic = getattr(parts[0], "bytes", None)  # zmq.Frame caches its bytes
    if raw_topic is None:
        raw_topic = bytes(_view(parts[0]))
    raw_header = _view(parts[1])
    if len(parts) == 3 and raw_header.nbytes <= MAX_HEADER_BYTES:
        known = _decode_known(raw_topic, raw_header, parts[2], t_receive_ns)
        if known is not None:
            return known
    elif len(parts) == 2 and shm is not None and raw_header.nbytes <= MAX_HEADER_BYTES:
        known = _decode_known_shm(raw_topic, raw_header, shm, t_receive_ns)
        if known is not None:
            return known
    try:
        topic = raw_topic.decode()
    except UnicodeDecodeError:
        raise ProtocolError("bad_topic", "topic is not UTF-8") from None
    header = _unpack_header(raw_header)
    version = header.get("v")
    # An exact type test: True == 1 and 1.0 == 1 in Python, but neither is version 1.
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError("unsupported_version", f"protocol version {version!r}, this node "
                            f"speaks {PROTOCOL_VERSION}")
    kind = header.get("kind")
    if kind not in KINDS:
        raise ProtocolError("unknown_kind", f"message kind {kind!r} is not one of {KINDS}")
    stream = header.get("stream")
    if stream != topic:  # a str equal to the topic, which was valid UTF-8
        _field(header, "stream", str)
        raise ProtocolError("bad_topic", f"topic {topic!r} differs from stream {stream!r}")
    seq = _int_field(header, "seq", 0)
    t_capture_ns = _int_field(header, "t_capture_ns")
    payload = parts[2:]

    if kind == "health":
        _expect_parts(payload, 0, kind, stream)
        return Health(stream, seq, t_capture_ns, _field(header, "stats", dict), t_receive_ns)
    if kind == "prediction":
        return _decode_prediction(header, stream, seq, payload, t_receive_ns)

    # A header with its payload inline, or in shared memory as `ShmWriter.wrap` writes it,
    # can match a layout the fast paths remember.
    inline = len(payload) == 1
    shm_header = None
    if not inline:
        if not payload and "shm" in header:
            if shm is None:
                raise ProtocolError("shm_unsupported", f"{_where(kind, stream)} is in shared "
                                    "memory, and this receiver reads none")
            shm_header = header["shm"]
            payload = (shm.resolve(shm_header, _where(kind, stream)),)
        else:
            _expect_parts(payload, 1, kind, stream)
    dtype_name = header.get("dtype")
    array = _array(payload[0], dtype_name, header.get("shape"), kind, stream)
    if kind == "frame":
        encoding = header.get("encoding")
        channels = FRAME_ENCODINGS.get(encoding) if type(encoding) is str else None
        if channels is None:
            raise ProtocolError("bad_field", f"{_where(kind, stream)} encoding {encoding!r} is "
                                f"not one of {sorted(FRAME_ENCODINGS)}")
        if dtype_name != "uint8" or array.ndim != 3 or array.shape[2] != channels:
            raise ProtocolError("bad_shape", f"{_where(kind, stream)} is {dtype_name} "
                                f"{list(array.shape)}, {encoding} needs uint8 [H, W, {channels}]")
        _remember(raw_header, _layout(kind, stream, dtype_name, array.shape, encoding),
                  inline, shm_header, seq, t_capture_ns)
        return Frame(stream, seq, t_capture_ns, array, str(encoding), t_receive_ns)
    if kind == "audio":
        if dtype_name not in ("int16", "float32") or array.ndim != 2:
            raise ProtocolError("bad_shape", f"{_where(kind, stream)} is {dtype_name} "
                                f"{list(array.shape)}, needs int16 or float32 [n, channels]")
        sample_rate = _int_field(header, "sample_rate", 1)
        sample_index = _int_field(header, "sample_index", 0)
        _remember(raw_header, _layout(kind, stream, dtype_name, array.shape, sample_rate),
                  inline, shm_header, seq, t_capture_ns, sample_index)
        return AudioChunk(stream, seq, t_capture_ns, sample_rate, sample_index, array,
                          t_receive_ns)
    # joints
    names = header.get("names")
    if type(names) is not list or set(map(type, names)) - {str}:
        raise ProtocolError("bad_field", f"{_where(kind, stream)} names {names!r} is not a "
                            "list of strings")
    if dtype_name != "float64" or array.shape != (3, len(names)):
        raise ProtocolError("bad_shape", f"{_where(kind, stream)} is {dtype_name} "
                            f"{list(array.shape)}, needs float64 [3, {len(names)}] for "
                            f"{len(names)} names")
    _remember(raw_header, _layout(kind, stream, dtype_name, array.shape, tuple(names)),
              inline, shm_header, seq, t_capture_ns)
    return JointState(stream, seq, t_capture_ns, tuple(names), array[0], array[1], array[2],
                      t_receive_ns)


# Fast paths. A header written by `encode` for a stream is a constant prefix followed by
# int64 fields at fixed offsets (see _Layout). Once a header has passed full validation and
# is byte-identical to what `encode` writes for that message, its layout is remembered. A
# later header equal to a remembered prefix plus the same fixed-width suffix can only differ
# in those integers, so checking them and the payload size is the full validation; anything
# else, including every error, takes the full path. This halves decode time, which is most
# of the protocol's cost over raw pyzmq for small messages. A header `ShmWriter.wrap` moved
# into shared memory has, after that, one constant part per ring and four more fixed-width
# integers (fusion_node.shm.shm_entry); it is remembered per topic, with its segment.
_KNOWN: dict[bytes, _Layout] = {}
# topic -> (layout, its prefix with one more map entry, the shm entry's constant part,
# segment, the stream's name in errors)
_KNOWN_SHM: dict[bytes, tuple[_Layout, bytes, bytes, str, str]] = {}


def _remember(raw_header: memoryview, layout: _Layout, inline: bool, shm_header: Any,
              seq: int, t_capture_ns: int, sample_index: int = 0) -> None:
    if inline:
        if layout.prefix in _KNOWN or raw_header != _header(layout, seq, t_capture_ns,
                                                              sample_index):
            return
        if len(_KNOWN) >= _MAX_LAYOUTS:
            _KNOWN.clear()
        _KNOWN[layout.prefix] = layout
    elif shm_header is not None and layout.prefix[0] < 0x8F:  # as resolved by ShmReader
        segment = shm_header["segment"]
        known = _KNOWN_SHM.get(layout.topic)
        if known is not None and known[0] is layout and known[3] == segment:
            return
        prefix = bytes((layout.prefix[0] + 1,)) + layout.prefix[1:]
        entry_prefix = shm_entry_prefix(segment)
        expected = (prefix + _header(layout, seq, t_capture_ns, sample_index)[len(prefix):]
                    + shm_entry(entry_prefix, shm_header["slot"], shm_header["generation"],
                                shm_header["offset"], shm_header["length"]))
        if raw_header != expected:
            return
        if len(_KNOWN_SHM) >= _MAX_LAYOUTS:
            _KNOWN_SHM.clear()
        _KNOWN_SHM[layout.topic] = (layout, prefix, entry_prefix, segment,
                                    _where(layout.kind, layout.stream))


def _decode_known_shm(raw_topic: bytes, raw_header: memoryview, shm: ShmReader,
                      t_receive_ns: int) -> Message | None:
    """Decode a shared-memory header that matches a remembered layout and segment, or
    return None. Resolving the slot may raise, as on the full path."""
    known = _KNOWN_SHM.get(raw_topic)
    if known is None:
        return None
    layout, prefix, entry_prefix, segment, where = known
    raw = bytes(raw_header)
    fields_end = len(prefix) + layout.suffix.size
    if not (raw.startswith(prefix) and raw.startswith(entry_prefix, fields_end)):
        return None
    ints = shm_ints(raw, fields_end + len(entry_prefix))
    if ints is None:
        return None
    fields = layout.suffix.unpack_from(raw, len(prefix))
    if (fields[0] != _SEQ_KEY or fields[2] != _T_CAPTURE_KEY or fields[1] < 0
            or ints[3] != layout.nbytes):
        return None
    if layout.kind == "audio" and (fields[4] != _SAMPLE_INDEX_KEY or fields[5] < 0):
        return None
    buf = shm.resolve_slot(segment, *ints, where)
    return _message_of(layout, fields, np.ndarray(layout.shape, layout.dtype, buf),
                       t_receive_ns)


def _decode_known(raw_topic: bytes, raw_header: memoryview, part: Buffer,
                  t_receive_ns: int) -> Message | None:
    """Decode a header that matches a remembered layout, or return None."""
    n = raw_header.nbytes
    if n <= _SEQ_T_INDEX.size:
        return None
    # Both suffixes start with fixstr "seq" (0xa3); where it sits says which one to try.
    size = _SEQ_T.size if raw_header[n - _SEQ_T.size] == 0xA3 else _SEQ_T_INDEX.size
    layout = _KNOWN.get(bytes(raw_header[:n - size]))
    if (layout is None or raw_topic != layout.topic
            or n != len(layout.prefix) + layout.suffix.size):
        return None
    fields = layout.suffix.unpack_from(raw_header, len(layout.prefix))
    if fields[0] != _SEQ_KEY or fields[2] != _T_CAPTURE_KEY or fields[1] < 0:
        return None
    buf = _view(part)
    if buf.nbytes != layout.nbytes:
        return None
    if layout.kind == "audio" and (fields[4] != _SAMPLE_INDEX_KEY or fields[5] < 0):
        return None
    return _message_of(layout, fields, np.ndarray(layout.shape, layout.dtype, buf.toreadonly()),
                       t_receive_ns)


def _message_of(layout: _Layout, fields: tuple[Any, ...], array: np.ndarray,
                t_receive_ns: int) -> Message:
    """The message a remembered layout's header describes; `fields` are its suffix's."""
    if layout.kind == "frame":
        return Frame(layout.stream, fields[1], fields[3], array, layout.extra, t_receive_ns)
    if layout.kind == "audio":
        return AudioChunk(layout.stream, fields[1], fields[3], layout.extra, fields[5], array,
                          t_receive_ns)
    return JointState(layout.stream, fields[1], fields[3], layout.extra, array[0], array[1],
                      array[2], t_receive_ns)


def _expect_parts(payload: Sequence[Buffer], count: int, kind: str, stream: str) -> None:
    if len(payload) != count:
        raise ProtocolError("truncated" if len(payload) < count else "too_many_parts",
                            f"{_where(kind, stream)} has {len(payload)} payload part(s), "
                            f"expected {count}")


def _decode_prediction(header: dict[str, Any], stream: str, seq: int,
                       payload: Sequence[Buffer], t_receive_ns: int) -> Prediction:
    kind = "prediction"
    specs = _field(header, "arrays", list)
    _expect_parts(payload, len(specs), kind, stream)
    arrays: dict[str, np.ndarray] = {}
    for spec, part in zip(specs, payload):
        if type(spec) is not dict or type(spec.get("name")) is not str:
            raise ProtocolError("bad_field", f"{_where(kind, stream)} array spec {spec!r} has "
                                "no name")
        name = spec["name"]
        if name in arrays:
            raise ProtocolError("bad_field", f"{_where(kind, stream)} has two arrays {name!r}")
        arrays[name] = _array(part, spec.get("dtype"), spec.get("shape"), kind, stream, name)
    mask = _field(header, "mask", dict)
    if not all(type(k) is str and type(v) is bool for k, v in mask.items()):
        raise ProtocolError("bad_field", f"{_where(kind, stream)} mask {mask!r} is not a map "
                            "of bools")
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
