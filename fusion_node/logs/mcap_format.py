"""MCAP logs: how fusion-node records protocol messages, and how it reads them back.

A log is an MCAP file (https://mcap.dev) holding:
  - one channel per topic, with the schema of its message kind (`fusion_node.frame`,
    `fusion_node.audio`, `fusion_node.joints`, `fusion_node.prediction`, `fusion_node.health`;
    schema encoding `fusion-node-protocol`, message encoding `fusion-node-parts`);
  - as message data, the protocol's multipart message `[topic, header, payload...]` framed as
    a u32 part count, one u32 length per part, then the parts: the bytes `protocol.encode`
    writes (or, recording from sockets, the bytes received), so `protocol.decode` of
    `unframe(data)` gives the message back, arrays and all;
  - `log_time` = when the message was received (recording in the node: when it entered the
    alignment buffer, where the engines see it), `publish_time` = its capture time (a
    prediction's `t_ref_ns`), both on the recording host's monotonic clock;
  - `node.window_cuts` (JSON, schema `fusion_node.window_cut`), when the node records: when
    each engine window was cut, stamped under the same lock as every message entering the
    alignment buffer, so a replay rebuilds each live window exactly (`RecordingBuffer`);
  - preview channels `preview/<topic>` in Foxglove's well-known JSON schemas so that Foxglove
    shows the camera and plays the audio: `foxglove.RawImage` at half resolution and at most
    `preview_hz`, `foxglove.RawAudio` as pcm-s16. They are for viewing; replay ignores them;
  - metadata `fusion_node.recording` (protocol version, source, launch config, model hashes,
    and from a live recording `wall_clock`: a monotonic↔wall time pair for display,
    `fusion_node.clock.WallClockMapping`) at the start and `fusion_node.recording_end`
    (counts, drops) when the recorder finishes.

Chunks are bounded in size and closed at least every `flush_interval_ns`, so a recorder that
dies loses only the chunk it had in memory; `fusion-node log recover` gets everything else.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import struct
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
from mcap.data_stream import RecordBuilder
from mcap.reader import make_reader
from mcap.records import Channel, ChunkIndex, Schema
from mcap.writer import CompressionType, Writer

from fusion_node import __version__
from fusion_node.errors import ProtocolError, ReplayError
from fusion_node.protocol import (
    MAX_PAYLOAD_PARTS,
    PROTOCOL_VERSION,
    AudioChunk,
    Frame,
    Health,
    JointState,
    Message,
    Prediction,
    decode,
    encode,
)

log = logging.getLogger(__name__)

SCHEMA_ENCODING = "fusion-node-protocol"
MESSAGE_ENCODING = "fusion-node-parts"
SCHEMA_PREFIX = "fusion_node."
PREVIEW_PREFIX = "preview/"
PREVIEW_OF_KEY = "fusion_node.preview_of"  # channel metadata naming the previewed topic
RECORDING_METADATA = "fusion_node.recording"  # a format name: old logs carry it
RECORDING_END_METADATA = "fusion_node.recording_end"
WALL_CLOCK_KEY = "wall_clock"  # in RECORDING_METADATA: WallClockMapping.to_json()
PREVIEW = "preview"
WINDOW_CUT = "window_cut"
WINDOW_CUTS_TOPIC = "node.window_cuts"
KIND_OF: dict[type, str] = {Frame: "frame", AudioChunk: "audio", JointState: "joints",
                            Prediction: "prediction", Health: "health"}
COMPRESSIONS = {"lz4": CompressionType.LZ4, "zstd": CompressionType.ZSTD,
                "none": CompressionType.NONE}
MCAP_MAGIC = b"\x89MCAP0\r\n"

# 1 MiB chunks: a crash loses about one 640x480 frame, and no copy of a chunk (the mcap
# writer copies each one a few times, holding the GIL) takes long enough to delay a tick.
DEFAULT_CHUNK_SIZE = 1 << 20
DEFAULT_FLUSH_INTERVAL_NS = 1_000_000_000
DEFAULT_PREVIEW_HZ = 10.0
PREVIEW_STRIDE = 2  # half resolution: enough to see the scene, a quarter of the bytes

_TIME_SCHEMA = {"type": "object", "title": "time", "properties": {
    "sec": {"type": "integer", "minimum": 0},
    "nsec": {"type": "integer", "minimum": 0, "maximum": 999_999_999}}}
_UINT = {"type": "integer", "minimum": 0}
_BYTES = {"type": "string", "contentEncoding": "base64"}
# Foxglove recognises these by schema name; the properties are its documented fields.
RAW_IMAGE_SCHEMA: dict[str, Any] = {
    "title": "foxglove.RawImage", "description": "A raw image", "type": "object",
    "properties": {"timestamp": _TIME_SCHEMA, "frame_id": {"type": "string"},
                   "width": _UINT, "height": _UINT, "encoding": {"type": "string"},
                   "step": _UINT, "data": _BYTES}}
RAW_AUDIO_SCHEMA: dict[str, Any] = {
    "title": "foxglove.RawAudio", "description": "A block of interleaved audio samples",
    "type": "object",
    "properties": {"timestamp": _TIME_SCHEMA, "data": _BYTES, "format": {"type": "string"},
                   "sample_rate": _UINT, "number_of_channels": _UINT}}
_PREVIEW_SCHEMAS = {"frame": RAW_IMAGE_SCHEMA, "audio": RAW_AUDIO_SCHEMA}
WINDOW_CUT_SCHEMA: dict[str, Any] = {
    "title": "fusion_node.window_cut",
    "description": "An engine's window for t_ref_ns was cut at this message's log time",
    "type": "object",
    "properties": {"topic": {"type": "string"}, "t_ref_ns": {"type": "integer"}}}


@dataclass(frozen=True)
class WindowCut:
    """The window of the engine publishing `topic`, for `t_ref_ns`, was cut."""

    topic: str
    t_ref_ns: int
    stream: str = WINDOW_CUTS_TOPIC


# -- framing --------------------------------------------------------------------------------

def _flat(part: Any) -> memoryview:
    view = getattr(part, "buffer", None)  # a zmq.Frame received with copy=False
    if view is None:
        view = memoryview(part)
    return view if view.ndim == 1 and view.format == "B" else view.cast("B")


def frame_parts(parts: Sequence[Any]) -> bytes:
    """One message's parts as one MCAP message: count, lengths, then the parts."""
    views = [_flat(part) for part in parts]
    head = struct.pack(f"<{len(views) + 1}I", len(views), *(v.nbytes for v in views))
    return b"".join((head, *views))


def unframe(data: bytes | memoryview) -> list[memoryview]:
    """The parts framed by `frame_parts`, as views of `data`; ReplayError if malformed."""
    view = memoryview(data)
    if view.nbytes < 4:
        raise ReplayError(f"message data is {view.nbytes} bytes, too short for a part count")
    (count,) = struct.unpack_from("<I", view)
    if not 2 <= count <= 2 + MAX_PAYLOAD_PARTS:
        raise ReplayError(f"message data declares {count} parts, expected 2 to "
                          f"{2 + MAX_PAYLOAD_PARTS}")
    offset = 4 + 4 * count
    if view.nbytes < offset:
        raise ReplayError(f"message data is {view.nbytes} bytes, too short for {count} lengths")
    lengths = struct.unpack_from(f"<{count}I", view, 4)
    if offset + sum(lengths) != view.nbytes:
        raise ReplayError(f"message data is {view.nbytes} bytes, its parts declare "
                          f"{offset + sum(lengths)}")
    parts = []
    for length in lengths:
        parts.append(view[offset:offset + length])
        offset += length
    return parts


def _uint64(t_ns: int) -> int:
    # MCAP times are unsigned; the header keeps the exact (signed) protocol time.
    return min(max(t_ns, 0), 2**64 - 1)


def _stamp(t_ns: int) -> dict[str, int]:
    t_ns = max(t_ns, 0)
    return {"sec": t_ns // 1_000_000_000, "nsec": t_ns % 1_000_000_000}


def topic_matches(topic: str, topics: Iterable[str]) -> bool:
    """Whether `topic` is selected by `topics`: exact names, or prefixes ending in '.'
    (`pred.` selects every prediction topic). An empty selection selects everything."""
    selection = tuple(topics)
    return not selection or any(topic == t or (t.endswith(".") and topic.startswith(t))
                                for t in selection)


# -- writing --------------------------------------------------------------------------------

class _FileSink:
    """An unbuffered file for the mcap writer: each finished chunk goes to the kernel at once,
    so a killed process leaves every finished chunk on disk."""

    def __init__(self, path: str, overwrite: bool) -> None:
        # O_EXCL unless asked: an existing log (an hour of a robot's run) is never replaced
        # by accident.
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
        self._fd = os.open(path, flags, 0o644)
        self._position = 0

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data)
        while view.nbytes:
            written = os.write(self._fd, view)
            view = view[written:]
            self._position += written
        return len(data)

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        pass  # nothing is buffered here

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


class _RawRecord:
    """An MCAP record already serialised; `write` is what the mcap writer calls on records."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def write(self, builder: RecordBuilder) -> None:
        builder.write(self.data)


class _SpilledChunkIndexes:
    """The mcap writer's list of chunk indexes, kept in an unlinked file beside the log.

    The writer holds one index per chunk until `finish` writes them into the summary: about
    1 KB each, a dozen chunks a second with a camera, so in memory they grew a recording
    node by about 50 MB an hour. Here they cost disk instead; the writer only appends to this
    list and iterates over it once, at `finish`."""

    def __init__(self, directory: str) -> None:
        self._file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 - closed by close()

    def append(self, index: ChunkIndex) -> None:
        builder = RecordBuilder()
        index.write(builder)
        self._file.write(builder.end())

    def __iter__(self) -> Iterator[_RawRecord]:
        self._file.flush()
        self._file.seek(0)
        while header := self._file.read(9):
            _opcode, length = struct.unpack("<BQ", header)
            yield _RawRecord(header + self._file.read(length))
        self._file.seek(0, os.SEEK_END)

    def close(self) -> None:
        self._file.close()


class LogWriter:
    """Writes protocol messages to an MCAP log, one call at a time (not thread-safe)."""

    def __init__(self, path: str, *, compression: str = "lz4",
                 chunk_size: int = DEFAULT_CHUNK_SIZE, preview_hz: float = DEFAULT_PREVIEW_HZ,
                 flush_interval_ns: int = DEFAULT_FLUSH_INTERVAL_NS,
                 metadata: dict[str, str] | None = None, overwrite: bool = False) -> None:
        if compression not in COMPRESSIONS:
            raise ReplayError(f"compression {compression!r} is not one of {sorted(COMPRESSIONS)}")
        if chunk_size <= 0 or preview_hz < 0:
            raise ReplayError(f"log {path!r}: chunk_size {chunk_size} must be positive and "
                              f"preview_hz {preview_hz} not negative")
        self.path = path
        try:
            self._sink = _FileSink(path, overwrite)
        except FileExistsError:
            raise ReplayError(f"log {path!r} exists; pass --force (launch file: record."
                              "overwrite = true) to overwrite it") from None
        except OSError as exc:
            raise ReplayError(f"cannot write log {path!r}: {exc.strerror}") from None
        self._writer = Writer(self._sink, chunk_size=chunk_size,  # type: ignore[arg-type]
                              compression=COMPRESSIONS[compression])
        # The writer's private list (mcap 1.6, pinned in pyproject.toml): it has no option
        # to keep its chunk indexes anywhere but in memory.
        if type(getattr(self._writer, "_Writer__chunk_indices", None)) is not list:
            raise RuntimeError("this mcap version keeps its chunk indexes elsewhere; "
                               "fusion-node needs mcap 1.6")
        self._chunk_indexes = _SpilledChunkIndexes(os.path.dirname(os.path.abspath(path)))
        self._writer._Writer__chunk_indices = self._chunk_indexes  # type: ignore[attr-defined]
        self._writer.start(library=f"fusion-node {__version__}")
        self._writer.add_metadata(RECORDING_METADATA, {
            "protocol_version": str(PROTOCOL_VERSION), "fusion_node_version": __version__,
            "clock": "CLOCK_MONOTONIC", "compression": compression, **(metadata or {})})
        self._schemas: dict[str, int] = {}
        self._channels: dict[str, int] = {}
        self._previews: dict[str, int] = {}
        self._preview_period_ns = round(1e9 / preview_hz) if preview_hz > 0 else None
        self._next_preview_ns: dict[str, int] = {}
        self._flush_interval_ns = flush_interval_ns
        self._last_flush_ns: int | None = None
        self.counts: Counter[str] = Counter()

    def _schema(self, name: str, encoding: str, data: bytes) -> int:
        schema_id = self._schemas.get(name)
        if schema_id is None:
            schema_id = self._schemas[name] = self._writer.register_schema(name, encoding, data)
        return schema_id

    def _channel(self, topic: str, kind: str) -> int:
        channel_id = self._channels.get(topic)
        if channel_id is None:
            schema = json.dumps({
                "protocol": "fusion-node", "protocol_version": PROTOCOL_VERSION, "kind": kind,
                "message_encoding": MESSAGE_ENCODING,
                "framing": "u32 LE part count n, n u32 LE part lengths, then the parts: "
                           "topic, msgpack header, payload arrays (docs/protocol.md)"})
            schema_id = self._schema(SCHEMA_PREFIX + kind, SCHEMA_ENCODING, schema.encode())
            channel_id = self._channels[topic] = self._writer.register_channel(
                topic, MESSAGE_ENCODING, schema_id, {"kind": kind})
        return channel_id

    def write(self, msg: Message, log_time_ns: int, parts: Sequence[Any] | None = None) -> None:
        """Record `msg`, received at `log_time_ns`; `parts` are its bytes as received, else
        it is encoded here."""
        kind = KIND_OF[type(msg)]
        channel_id = self._channel(msg.stream, kind)
        data = frame_parts(encode(msg) if parts is None else parts)
        self._writer.add_message(channel_id, _uint64(log_time_ns), data,
                                 _uint64(msg.t_capture_ns), msg.seq & 0xFFFFFFFF)
        self.counts[msg.stream] += 1
        if self._preview_period_ns is None:
            return
        if isinstance(msg, Frame):
            due = self._next_preview_ns.get(msg.stream)
            if due is None or msg.t_capture_ns >= due:
                self._next_preview_ns[msg.stream] = msg.t_capture_ns + self._preview_period_ns
                self._preview(msg, log_time_ns, *image_preview(msg, msg.t_capture_ns))
        elif isinstance(msg, AudioChunk):
            self._preview(msg, log_time_ns, *audio_preview(msg, msg.t_capture_ns))

    def write_cut(self, cut: WindowCut, t_cut_ns: int) -> None:
        """Record that the window of `cut` was cut at `t_cut_ns`."""
        channel_id = self._channels.get(WINDOW_CUTS_TOPIC)
        if channel_id is None:
            schema_id = self._schema(WINDOW_CUT_SCHEMA["title"], "jsonschema",
                                     json.dumps(WINDOW_CUT_SCHEMA).encode())
            channel_id = self._channels[WINDOW_CUTS_TOPIC] = self._writer.register_channel(
                WINDOW_CUTS_TOPIC, "json", schema_id)
        body = json.dumps({"topic": cut.topic, "t_ref_ns": cut.t_ref_ns}).encode()
        self._writer.add_message(channel_id, _uint64(t_cut_ns), body, _uint64(cut.t_ref_ns))
        self.counts[WINDOW_CUTS_TOPIC] += 1

    def _preview(self, msg: Frame | AudioChunk, log_time_ns: int, body: dict[str, Any],
                 data: bytes) -> None:
        channel_id = self._previews.get(msg.stream)
        if channel_id is None:
            schema = _PREVIEW_SCHEMAS[KIND_OF[type(msg)]]
            schema_id = self._schema(schema["title"], "jsonschema", json.dumps(schema).encode())
            channel_id = self._previews[msg.stream] = self._writer.register_channel(
                PREVIEW_PREFIX + msg.stream, "json", schema_id, {PREVIEW_OF_KEY: msg.stream})
        self._writer.add_message(channel_id, _uint64(log_time_ns), preview_json(body, data),
                                 _uint64(msg.t_capture_ns), msg.seq & 0xFFFFFFFF)

    def flush_if_due(self, now_ns: int) -> None:
        """Close the chunk in progress and sync the file if a flush interval has passed, so
        a quiet stream does not sit in memory."""
        if self._last_flush_ns is None:
            self._last_flush_ns = now_ns
        elif now_ns - self._last_flush_ns >= self._flush_interval_ns:
            self._last_flush_ns = now_ns
            self._writer.flush()
            self._sink.sync()

    def close(self, end_metadata: dict[str, str] | None = None) -> None:
        """Write the summary and index, then close: the log is complete."""
        try:
            self._writer.add_metadata(RECORDING_END_METADATA, {
                "messages": json.dumps(dict(self.counts)), **(end_metadata or {})})
            self._writer.finish()
            self._sink.sync()
        finally:
            self._sink.close()
            self._chunk_indexes.close()

    def abort(self) -> None:
        """Close the file as it is (after a write error): `log recover` can still read it."""
        self._sink.close()
        self._chunk_indexes.close()


def preview_json(body: dict[str, Any], data: bytes) -> bytes:
    """A preview `body` as JSON with `data` added as its base64 "data" field."""
    # Base64 needs no JSON escaping: json.dumps of the MB-sized string held the GIL 1 ms.
    return json.dumps(body)[:-1].encode() + b', "data": "' + base64.b64encode(data) + b'"}'


def image_preview(frame: Frame, stamp_ns: int) -> tuple[dict[str, Any], bytes]:
    """A foxglove.RawImage (without its data) stamped `stamp_ns`, and its pixels."""
    image = np.ascontiguousarray(frame.image[::PREVIEW_STRIDE, ::PREVIEW_STRIDE])
    height, width, channels = image.shape
    return {"timestamp": _stamp(stamp_ns), "frame_id": frame.stream,
            "width": width, "height": height, "encoding": frame.encoding,
            "step": width * channels}, image.tobytes()


def audio_preview(chunk: AudioChunk, stamp_ns: int) -> tuple[dict[str, Any], bytes]:
    """A foxglove.RawAudio (without its data) stamped `stamp_ns`, and its pcm-s16 samples."""
    samples = chunk.samples
    if samples.dtype != np.int16:  # float32 at full scale ±1.0
        samples = np.clip(np.round(samples * 32767.0), -32768, 32767)
    pcm = np.ascontiguousarray(samples, dtype="<i2")
    return {"timestamp": _stamp(stamp_ns), "format": "pcm-s16",
            "sample_rate": chunk.sample_rate,
            "number_of_channels": samples.shape[1]}, pcm.tobytes()


# -- reading --------------------------------------------------------------------------------

@dataclass
class LogChannel:
    topic: str
    kind: str  # a message kind, or PREVIEW


def classify_channel(path: str, channel: Channel, schema: Schema | None) -> LogChannel:
    """What a channel holds; ReplayError if it is not one fusion-node writes or can read."""
    if (schema is not None and schema.encoding == SCHEMA_ENCODING
            and schema.name.startswith(SCHEMA_PREFIX)
            and channel.message_encoding == MESSAGE_ENCODING):
        try:
            info = json.loads(schema.data)
        except ValueError:
            info = None
        version = info.get("protocol_version") if isinstance(info, dict) else None
        kind = info.get("kind") if isinstance(info, dict) else None
        if type(version) is not int:
            raise ReplayError(f"{path}: schema {schema.name!r} has no protocol version")
        if version != PROTOCOL_VERSION:
            newer = "a newer" if version > PROTOCOL_VERSION else "an older"
            raise ReplayError(f"{path}: topic {channel.topic!r} was recorded with {newer} "
                              f"protocol version {version}; this fusion-node reads version "
                              f"{PROTOCOL_VERSION}")
        if not isinstance(kind, str) or kind not in KIND_OF.values():
            raise ReplayError(f"{path}: schema {schema.name!r} has unknown kind {kind!r}")
        return LogChannel(channel.topic, kind)
    if (schema is not None and channel.topic == WINDOW_CUTS_TOPIC
            and schema.name == WINDOW_CUT_SCHEMA["title"]):
        return LogChannel(channel.topic, WINDOW_CUT)
    if (schema is not None and channel.metadata.get(PREVIEW_OF_KEY)
            and schema.name in (RAW_IMAGE_SCHEMA["title"], RAW_AUDIO_SCHEMA["title"])):
        return LogChannel(channel.topic, PREVIEW)
    name = "no schema" if schema is None else f"schema {schema.name!r} ({schema.encoding!r})"
    raise ReplayError(f"{path}: topic {channel.topic!r} has {name}, which fusion-node does "
                      "not record: not a fusion-node log")


@dataclass
class LogMessage:
    """One recorded protocol message, not yet decoded."""

    topic: str
    kind: str
    log_time_ns: int
    publish_time_ns: int
    data: bytes

    def parts(self, path: str) -> list[memoryview]:
        try:
            return unframe(self.data)
        except ReplayError as exc:
            raise ReplayError(f"{path}: message on {self.topic!r} at log time "
                              f"{self.log_time_ns}: {exc}") from None

    def decode(self, path: str) -> Message:
        """The protocol message, received at its log time; ReplayError if malformed."""
        try:
            return decode(self.parts(path), self.log_time_ns)
        except ProtocolError as exc:
            raise ReplayError(f"{path}: message on {self.topic!r} at log time "
                              f"{self.log_time_ns} does not decode: {exc}") from None


class ClampedFile:
    """A log file opened for mcap's readers, whose reads never ask for more bytes than remain.

    mcap reads a string or record of the length the file declares in one `read`, and a
    buffered file allocates that length before reading: a corrupt u32 length would allocate
    4 GiB (found by `bench fuzz`)."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self._size = os.fstat(file.fileno()).st_size

    def read(self, size: int = -1) -> bytes:
        left = max(self._size - self._file.tell(), 0)
        return self._file.read(left if size < 0 or size > left else size)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def seekable(self) -> bool:
        return True


def is_complete(path: str) -> bool:
    """Whether the file ends with the MCAP magic, i.e. the writer finished it."""
    try:
        with open(path, "rb") as file:
            size = file.seek(0, os.SEEK_END)
            if size < 2 * len(MCAP_MAGIC):
                return False
            file.seek(size - len(MCAP_MAGIC))
            return file.read() == MCAP_MAGIC
    except OSError as exc:
        raise ReplayError(f"cannot read log {path!r}: {exc.strerror}") from None


def check_magic(path: str) -> None:
    """ReplayError unless `path` is a readable file that starts like an MCAP file."""
    try:
        with open(path, "rb") as file:
            start = file.read(len(MCAP_MAGIC))
    except OSError as exc:
        raise ReplayError(f"cannot read log {path!r}: {exc.strerror}") from None
    if start != MCAP_MAGIC:
        raise ReplayError(f"{path}: not an MCAP file (it does not start with the MCAP magic)")


class LogReader:
    """A complete (indexed) fusion-node log, checked before anything is read from it."""

    def __init__(self, path: str) -> None:
        check_magic(path)
        if not is_complete(path):
            raise ReplayError(f"{path}: the log is incomplete (the recorder did not finish "
                              f"it); run `fusion-node log recover {path} FIXED.mcap` first")
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 - open until close(), like a file
        try:
            self._reader = make_reader(ClampedFile(self._file))
            summary = self._reader.get_summary()
        except Exception as exc:  # noqa: BLE001 - mcap raises many unrelated types
            self._file.close()
            raise ReplayError(f"{path}: unreadable MCAP summary ({exc})") from None
        if summary is None:
            self._file.close()
            raise ReplayError(f"{path}: the log has no summary; run `fusion-node log recover "
                              f"{path} FIXED.mcap` to index it")
        try:
            self.channels = {cid: classify_channel(path, channel,
                                                   summary.schemas.get(channel.schema_id))
                             for cid, channel in summary.channels.items()}
        except ReplayError:
            self._file.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def topics(self, kinds: Iterable[str] | None = None) -> list[str]:
        wanted = set(KIND_OF.values()) if kinds is None else set(kinds)
        return sorted({c.topic for c in self.channels.values() if c.kind in wanted})

    def metadata(self) -> dict[str, dict[str, str]]:
        try:
            return {m.name: dict(m.metadata) for m in self._reader.iter_metadata()}
        except Exception as exc:  # noqa: BLE001 - mcap raises many unrelated types
            raise ReplayError(f"{self.path}: unreadable metadata ({exc})") from None

    def messages(self, topics: Iterable[str] | None = None) -> Iterator[LogMessage]:
        """Messages in log-time order, ties in file order: of `topics`, or every protocol
        message (no previews, no window cuts)."""
        selected = self.topics() if topics is None else list(topics)
        iterator = self._reader.iter_messages(topics=selected, log_time_order=True)
        while True:
            try:
                item = next(iterator, None)
            except Exception as exc:  # noqa: BLE001 - mcap raises many unrelated types
                raise ReplayError(f"{self.path}: unreadable data ({exc}); try "
                                  "`fusion-node log recover`") from None
            if item is None:
                return
            _, channel, message = item
            info = self.channels[channel.id]
            if info.kind == PREVIEW:
                continue
            yield LogMessage(info.topic, info.kind, message.log_time, message.publish_time,
                             message.data)
