"""`fusion-node log info` and `fusion-node log recover`: look into a log, mend a broken one.

Both read the file as a stream of MCAP records (`mcap.stream_reader.StreamReader`, chunk CRCs
checked), so they work on a log whose recorder was killed: a chunk is used only once it has
been read whole and its CRC matches, and reading stops at the first record that is not whole.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from mcap.exceptions import EndOfFile
from mcap.reader import make_reader
from mcap.records import Attachment, Channel, Footer, Header, Message, Metadata, Schema
from mcap.stream_reader import CRCValidationError, StreamReader
from mcap.writer import Writer

from fusion_node import __version__
from fusion_node.errors import ReplayError
from fusion_node.logs.mcap_format import (
    PREVIEW,
    RECORDING_END_METADATA,
    RECORDING_METADATA,
    WINDOW_CUT,
    ClampedFile,
    LogMessage,
    check_magic,
    classify_channel,
    is_complete,
)
from fusion_node.protocol import AudioChunk, Health, SeqCounter


def _stop_reason(exc: Exception) -> str:
    if isinstance(exc, EndOfFile):
        return "the file ends inside a record (truncated)"
    if isinstance(exc, CRCValidationError):
        return "a chunk fails its CRC check (corrupt)"
    return f"unreadable record ({type(exc).__name__}: {exc})"


@dataclass
class _TopicStats:
    kind: str
    count: int = 0
    bytes: int = 0
    first_log_ns: int = 0
    last_log_ns: int = 0
    first_capture_ns: int = 0
    last_capture_ns: int = 0
    lost_samples: int = 0  # audio: samples missing from the sample_index sequence
    next_sample: int = -1
    seq: SeqCounter = field(default_factory=SeqCounter)

    def add(self, message: LogMessage, seq: int, t_capture_ns: int) -> None:
        if self.count == 0:
            self.first_log_ns, self.first_capture_ns = message.log_time_ns, t_capture_ns
        self.seq.note(seq)
        self.count += 1
        self.bytes += len(message.data)
        self.last_log_ns, self.last_capture_ns = message.log_time_ns, t_capture_ns

    def summary(self) -> dict[str, Any]:
        span_ns = self.last_capture_ns - self.first_capture_ns
        entry = {"kind": self.kind, "count": self.count,
                 # From capture times: the rate the source produced, without delivery jitter.
                 "rate_hz": round((self.count - 1) * 1e9 / span_ns, 3) if span_ns > 0 else None,
                 "first_seq": self.seq.first, "last_seq": self.seq.last,
                 "gaps": self.seq.gaps, "restarts": self.seq.restarts, "raw_mb": round(self.bytes / 2**20, 3)}
        if self.kind == "audio":
            entry["lost_samples"] = self.lost_samples
        return entry


def log_info(path: str) -> dict[str, Any]:
    """Topics, counts, rates, duration, seq gaps and drops of a log, complete or not."""
    check_magic(path)
    info: dict[str, Any] = {"path": path, "mb": round(os.path.getsize(path) / 2**20, 3),
                            "complete": is_complete(path), "error": None}
    schemas: dict[int, Schema] = {}
    channels: dict[int, Any] = {}
    topics: dict[str, _TopicStats] = {}
    other: Counter[str] = Counter()  # Foxglove previews, window cuts
    undecodable: Counter[str] = Counter()
    metadata: dict[str, dict[str, str]] = {}
    last_health: Health | None = None
    with open(path, "rb") as file:
        reader = StreamReader(ClampedFile(file), validate_crcs=True,  # type: ignore[arg-type]
                              record_size_limit=max(os.path.getsize(path), 1))
        try:
            for record in reader.records:
                if isinstance(record, Schema):
                    schemas[record.id] = record
                elif isinstance(record, Channel):
                    channels[record.id] = classify_channel(path, record,
                                                           schemas.get(record.schema_id))
                elif isinstance(record, Metadata):
                    metadata[record.name] = dict(record.metadata)
                elif isinstance(record, Message):
                    channel = channels.get(record.channel_id)
                    if channel is None:
                        raise ReplayError(f"{path}: a message on channel {record.channel_id} "
                                          "comes before that channel is defined")
                    if channel.kind in (PREVIEW, WINDOW_CUT):
                        other[channel.topic] += 1
                        continue
                    message = LogMessage(channel.topic, channel.kind, record.log_time,
                                         record.publish_time, record.data)
                    try:
                        msg = message.decode(path)
                    except ReplayError as exc:
                        undecodable[channel.topic] += 1
                        info.setdefault("first_undecodable", str(exc))
                        continue
                    stats = topics.setdefault(channel.topic, _TopicStats(channel.kind))
                    stats.add(message, msg.seq, msg.t_capture_ns)
                    if isinstance(msg, AudioChunk):
                        if 0 <= stats.next_sample < msg.sample_index:
                            stats.lost_samples += msg.sample_index - stats.next_sample
                        stats.next_sample = msg.sample_index + len(msg.samples)
                    elif isinstance(msg, Health):
                        last_health = msg
        except ReplayError:
            raise
        except Exception as exc:  # noqa: BLE001 - mcap raises many unrelated types
            info["error"] = _stop_reason(exc)
    recording = metadata.get(RECORDING_METADATA, {})
    info["protocol_version"] = recording.get("protocol_version")
    info["source"] = recording.get("source")
    info["compression"] = recording.get("compression")
    info["model_hashes"] = _json_map(path, RECORDING_METADATA, "model_hashes",
                                     recording.get("model_hashes", "{}"))
    if topics:
        first = min(s.first_log_ns for s in topics.values())
        last = max(s.last_log_ns for s in topics.values())
        info["duration_s"] = round((last - first) / 1e9, 3)
    else:
        info["duration_s"] = 0.0
    info["messages"] = sum(s.count for s in topics.values())
    info["topics"] = {t: topics[t].summary() for t in sorted(topics)}
    info["other_channels"] = dict(sorted(other.items()))
    info["undecodable"] = dict(undecodable)
    end = metadata.get(RECORDING_END_METADATA)
    recorder = last_health.stats.get("recorder") if last_health is not None else None
    if end is not None and "dropped" in end:
        info["recorder_dropped"] = _json_map(path, RECORDING_END_METADATA, "dropped",
                                             end["dropped"], counts=True)
        info["recorder_dropped_from"] = "the recorder's end record"
    elif isinstance(recorder, dict) and _is_counts(recorder.get("dropped", {})):
        info["recorder_dropped"] = recorder.get("dropped", {})
        info["recorder_dropped_from"] = "the last node.health (the recording did not finish)"
    else:
        info["recorder_dropped"] = None
        info["recorder_dropped_from"] = None
    if last_health is not None:
        streams = last_health.stats.get("streams")
        streams = streams if isinstance(streams, dict) else {}
        info["node_drops"] = {
            "rejected": last_health.stats.get("rejected", {}),
            "streams": {s: {k: v.get(k) for k in ("seq_gaps", "too_old", "duplicates")}
                        for s, v in streams.items() if isinstance(v, dict)}}
    return info


def _is_counts(value: Any) -> bool:
    return isinstance(value, dict) and all(type(v) is int for v in value.values())


def _json_map(path: str, record: str, key: str, text: str, counts: bool = False
              ) -> dict[str, Any]:
    """A JSON map kept in the log's metadata; ReplayError if it is not one (a corrupt log)."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict) or (counts and not _is_counts(value)):
        kind = "a JSON map of counts" if counts else "a JSON map"
        raise ReplayError(f"{path}: metadata {record}.{key} is not {kind}: {text[:80]!r}")
    return value


def format_info(info: dict[str, Any]) -> str:
    """`log info` as text."""
    state = "complete" if info["complete"] else "INCOMPLETE (run `fusion-node log recover`)"
    lines = [(f"{info['path']}: {info['mb']} MB, {state}, protocol "
              f"v{info['protocol_version']}, recorded by {info['source'] or 'unknown'}, "
              f"compression {info['compression'] or 'unknown'}"),
             f"duration {info['duration_s']} s, {info['messages']} messages"]
    if info["error"]:
        lines.append(f"stopped reading: {info['error']}")
    lines.append(f"{'topic':<16} {'kind':<10} {'count':>7} {'rate_hz':>9} {'seq':>15} "
                 f"{'gaps':>6} {'restarts':>8} {'raw MB':>9}")
    for topic, t in info["topics"].items():
        rate = "-" if t["rate_hz"] is None else f"{t['rate_hz']:.2f}"
        seq = f"{t['first_seq']}..{t['last_seq']}"
        extra = f"  lost samples {t['lost_samples']}" if t.get("lost_samples") else ""
        lines.append(f"{topic:<16} {t['kind']:<10} {t['count']:>7} {rate:>9} {seq:>15} "
                     f"{t['gaps']:>6} {t['restarts']:>8} {t['raw_mb']:>9.3f}{extra}")
    if info["other_channels"]:
        lines.append("also: " + ", ".join(f"{topic} ({count})"
                                          for topic, count in info["other_channels"].items()))
    if info["undecodable"]:
        lines.append(f"messages that do not decode: {info['undecodable']} (first: "
                     f"{info['first_undecodable']})")
    dropped = info["recorder_dropped"]
    if dropped is None:
        lines.append("recorder drops: unknown")
    else:
        detail = f" {dropped}" if dropped else ""
        lines.append(f"recorder drops: {sum(dropped.values())}{detail} (from "
                     f"{info['recorder_dropped_from']})")
    node = info.get("node_drops")
    if node:
        gaps = {s: v for s, v in node["streams"].items() if any(v.values())}
        lines.append(f"node drops (last node.health): rejected {node['rejected'] or 0}, "
                     f"streams {gaps or 'none'}")
    if info["model_hashes"]:
        lines.append("models: " + ", ".join(f"{t} {h}" for t, h in info["model_hashes"].items()))
    return "\n".join(lines)


@dataclass
class RecoverResult:
    messages: int = 0
    topics: list[str] = field(default_factory=list)
    was_complete: bool = False
    read_bytes: int = 0  # where the last whole record ends
    input_bytes: int = 0
    stop_reason: str = ""


def recover(broken: str, fixed: str) -> RecoverResult:
    """Copy every whole record of `broken` (read as a stream, up to the first record that is
    not whole) into a new, complete and indexed log `fixed`, then read `fixed` back: the count
    returned is what it holds. Raises ReplayError if nothing can be recovered or the output
    does not read back."""
    check_magic(broken)
    if os.path.abspath(fixed) == os.path.abspath(broken):
        raise ReplayError(f"{fixed}: the recovered log must be a new file, not the broken one")
    result = RecoverResult(input_bytes=os.path.getsize(broken))
    partial = fixed + ".partial"
    schema_ids: dict[int, int] = {}
    channel_ids: dict[int, int] = {}
    topics: set[str] = set()
    try:
        with open(broken, "rb") as source, open(partial, "wb") as output:
            writer = Writer(output)
            started = False
            reader = StreamReader(ClampedFile(source),  # type: ignore[arg-type]
                                  validate_crcs=True,
                                  record_size_limit=max(result.input_bytes, 1))
            try:
                for record in reader.records:
                    if not started:
                        profile = record.profile if isinstance(record, Header) else ""
                        writer.start(profile=profile,
                                     library=f"fusion-node {__version__} log recover")
                        started = True
                    if isinstance(record, Schema) and record.id not in schema_ids:
                        schema_ids[record.id] = writer.register_schema(
                            record.name, record.encoding, record.data)
                    elif isinstance(record, Channel) and record.id not in channel_ids:
                        if record.schema_id != 0 and record.schema_id not in schema_ids:
                            continue  # its schema was lost: its messages cannot be read
                        channel_ids[record.id] = writer.register_channel(
                            record.topic, record.message_encoding,
                            schema_ids.get(record.schema_id, 0), dict(record.metadata))
                        topics.add(record.topic)
                    elif isinstance(record, Message) and record.channel_id in channel_ids:
                        writer.add_message(channel_ids[record.channel_id], record.log_time,
                                           record.data, record.publish_time, record.sequence)
                        result.messages += 1
                    elif isinstance(record, Metadata):
                        writer.add_metadata(record.name, dict(record.metadata))
                    elif isinstance(record, Attachment):
                        writer.add_attachment(record.create_time, record.log_time,
                                              record.name, record.media_type, record.data)
                    elif isinstance(record, Footer):
                        result.was_complete = True
                    result.read_bytes = source.tell()
            except Exception as exc:  # noqa: BLE001 - mcap raises many unrelated types
                result.stop_reason = _stop_reason(exc)
            if not started:
                writer.start(library=f"fusion-node {__version__} log recover")
            writer.finish()
        if result.messages == 0:
            raise ReplayError(f"{broken}: no whole chunk of messages to recover "
                              f"({result.stop_reason or 'the log holds no messages'})")
        held = _count_messages(partial)
        if held != result.messages:
            raise ReplayError(f"{fixed}: reads back {held} messages, {result.messages} were "
                              "written; not kept")
        os.replace(partial, fixed)
    except OSError as exc:
        raise ReplayError(f"cannot recover {broken} into {fixed}: {exc}") from None
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    result.topics = sorted(topics)
    return result


def _count_messages(path: str) -> int:
    """Messages a complete log holds, read back through its index."""
    try:
        with open(path, "rb") as file:
            return sum(1 for _ in make_reader(file).iter_messages(log_time_order=False))
    except Exception as exc:  # noqa: BLE001 - mcap raises many unrelated types
        raise ReplayError(f"{path}: the recovered log does not read back ({exc})") from None
