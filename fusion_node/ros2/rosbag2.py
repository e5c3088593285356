"""rosbag2 both ways: export a fusion-node log as a rosbag2, and read a rosbag2 as a log.

  `export_log(log, out, force=False, compression="zstd")` writes every protocol message of a
      fusion-node log (no previews, no window cuts) to a rosbag2 in MCAP storage (`ros2msg`
      schemas, CDR), as `fusion_node.ros2.messages` maps them. Each message's bag time is its
      sensor time (capture time; a prediction's t_ref), the same as its header stamp. `out` is
      a bag directory (metadata.yaml + `<name>.mcap`, what `ros2 bag record -o` makes) or, if
      it ends in `.mcap`, a single MCAP file, which `ros2 bag play` also reads.
  `is_rosbag2(path)` whether `path` is a rosbag2 (a bag directory, a `.db3`, or an MCAP file
      with the `ros2` profile) rather than a fusion-node log.
  `bag_to_log(bag, out_log, streams, topic_map, driver_topics)` writes the bag's camera,
      audio and joint topics into a fusion-node log, each message received at its header
      stamp (the sensor time), so `replay` runs its one deterministic engine over a bag as
      over any log. What is read (`replay_topics(config)`): the launch file's `[replay] ros2`
      table ({"/cam/image_raw" = "camera.front"}; each topic must be in the bag), and the
      topics of its `kind = "ros2"` drivers (a bag recorded on the robot that launch file
      runs; read where the bag has them, the table wins for a stream both name). With
      neither, the topics named by `messages.ros_topic`'s rule, as `export_log` writes them.

rosbags (the `[ros2]` extra) is imported only by the functions that need it, so a plain
`replay LOG.mcap` works without it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fusion_node.errors import ConfigError, ProtocolError, ReplayError
from fusion_node.logs.mcap_format import MCAP_MAGIC, LogReader, LogWriter

# Jazzy's rosbag2 writes metadata version 8; version 9 (Kilted) changed how QoS is stored,
# which older rosbag2 readers refuse.
BAG_VERSION: Literal[8] = 8
EXPORT_COMPRESSIONS = ("zstd", "none")  # MCAP chunk compression; raw images shrink a lot
# The ROS 2 message types a replay reads, by the protocol kind they become.
_INPUT_KINDS = {"sensor_msgs/msg/Image": "frame", "fusion_node_msgs/msg/AudioChunk": "audio",
                "sensor_msgs/msg/JointState": "joints"}


def _ros2_extra() -> None:
    try:
        import rosbags  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"rosbag2 support needs the [ros2] extra (rosbags): {exc}; install "
                          "it with `pip install 'fusion-node[ros2]'`") from None


# -- export ----------------------------------------------------------------------------------

@dataclass
class ExportResult:
    out: str
    messages: int = 0
    topics: dict[str, dict[str, Any]] = field(default_factory=dict)  # ROS topic: type, count
    duration_ns: int = 0


def _check_export_target(out: Path, force: bool) -> None:
    if out.suffix == ".db3":
        raise ConfigError(f"log export --ros2 {out}: the export writes MCAP storage; name a bag "
                          "folder or a .mcap file")
    if not out.exists():
        if not out.parent.is_dir():
            raise ConfigError(f"log export --ros2 {out}: folder {out.parent} does not exist")
        return
    if not force:
        raise ConfigError(f"log export --ros2 {out}: exists; pass --force to overwrite it")
    if out.suffix == ".mcap":
        if out.is_dir():
            raise ConfigError(f"log export --ros2 {out}: is a folder, not an MCAP file")
        return
    # --force replaces a bag, never an arbitrary folder someone named by mistake.
    if not out.is_dir() or (any(out.iterdir()) and not (out / "metadata.yaml").exists()):
        raise ConfigError(f"log export --ros2 {out}: exists and is not a rosbag2 folder (no "
                          "metadata.yaml); not replacing it even with --force")


def _bindings(reader: LogReader) -> dict[str, str]:
    """Engine binding by prediction topic, from the launch config stored in the log."""
    from fusion_node.logs.replay import config_from_log

    try:
        config = config_from_log(reader.path, reader.metadata())
    except ReplayError:
        return {}
    return {} if config is None else {e.topic: e.binding for e in config.engines}


def export_log(log: str, out: str, *, force: bool = False,
               compression: str = "zstd") -> ExportResult:
    """Write the fusion-node log `log` as a rosbag2 at `out` (see the module docstring)."""
    _ros2_extra()
    from rosbags.rosbag2 import CompressionFormat, CompressionMode, StoragePlugin, Writer
    from rosbags.rosbag2.errors import WriterError

    from fusion_node.ros2.messages import PREDICTION, prediction_type, ros_topic, to_ros, typestore

    if compression not in EXPORT_COMPRESSIONS:
        raise ConfigError(f"log export: compression {compression!r} is not one of "
                          f"{EXPORT_COMPRESSIONS}")
    target = Path(out)
    _check_export_target(target, force)
    store = typestore()
    result = ExportResult(out)
    # Written beside the target and moved into place when complete: a failed export leaves
    # no half bag, and --force replaces the old one only then.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        bag_dir = staging / (target.stem if target.suffix == ".mcap" else target.name)
        writer = Writer(bag_dir, version=BAG_VERSION, storage_plugin=StoragePlugin.MCAP)
        if compression == "zstd":
            writer.set_compression(CompressionMode.STORAGE, CompressionFormat.ZSTD)
        writer.set_custom_data("fusion_node.source_log", os.path.abspath(log))
        writer.set_custom_data("fusion_node.clock", "CLOCK_MONOTONIC")
        connections: dict[str, Any] = {}
        owner: dict[str, str] = {}  # ROS topic -> the stream that claimed it
        first_ns = last_ns = None
        with LogReader(log) as reader, writer:
            bindings = _bindings(reader)
            for logged in reader.messages():
                msg = logged.decode(log)
                connection = connections.get(logged.topic)
                if connection is None:
                    topic = ros_topic(msg.stream, logged.kind, bindings.get(logged.topic))
                    ros_type = topic.type
                    if logged.kind == "prediction" and logged.topic not in bindings:
                        ros_type = prediction_type(msg)  # type: ignore[arg-type]
                    if topic.name in owner:
                        raise ReplayError(f"{log}: streams {owner[topic.name]!r} and "
                                          f"{logged.topic!r} both map to ROS 2 topic "
                                          f"{topic.name!r}")
                    owner[topic.name] = logged.topic
                    connection = connections[logged.topic] = writer.add_connection(
                        topic.name, ros_type, typestore=store)
                    result.topics[topic.name] = {"type": ros_type, "stream": logged.topic,
                                                 "messages": 0}
                t_ns = msg.t_capture_ns
                if t_ns < 0:
                    raise ReplayError(f"{log}: {logged.topic!r} message stamped {t_ns} ns, "
                                      "before a bag's time 0")
                try:
                    ros_msg = to_ros(msg, connection.msgtype)
                except ProtocolError as exc:
                    hint = (f" (the topic is {connection.msgtype}; an engine whose outputs "
                            f"change shape needs {PREDICTION})"
                            if logged.kind == "prediction" else "")
                    raise ReplayError(f"{log}: {logged.topic!r} at log time "
                                      f"{logged.log_time_ns}: {exc}{hint}") from None
                writer.write(connection, t_ns, store.serialize_cdr(ros_msg, connection.msgtype))
                result.topics[connection.topic]["messages"] += 1
                result.messages += 1
                first_ns = t_ns if first_ns is None else min(first_ns, t_ns)
                last_ns = t_ns if last_ns is None else max(last_ns, t_ns)
        produced = bag_dir / f"{bag_dir.name}.mcap" if target.suffix == ".mcap" else bag_dir
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(produced, target)
    except WriterError as exc:
        raise ReplayError(f"log export --ros2 {out}: {exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.duration_ns = 0 if first_ns is None or last_ns is None else last_ns - first_ns
    return result


# -- import ----------------------------------------------------------------------------------

def is_rosbag2(path: str) -> bool:
    """Whether `path` is a rosbag2 (directory, .db3, or ros2-profile MCAP file)."""
    target = Path(path)
    if target.is_dir() or target.suffix == ".db3":
        return True
    try:
        with open(target, "rb") as file:
            start = file.read(len(MCAP_MAGIC) + 64)
    except OSError:
        return False  # the log reader says what is wrong with it
    if not start.startswith(MCAP_MAGIC):
        return False
    # The Header record (opcode 0x01, u64 length) starts with the profile string (u32 length).
    body = start[len(MCAP_MAGIC) + 9:]
    size = int.from_bytes(body[:4], "little") if start[len(MCAP_MAGIC)] == 0x01 else 0
    return body[4:4 + size] == b"ros2"


def _open_bag(bag: str) -> Any:
    _ros2_extra()
    from rosbags.rosbag2 import Reader
    from rosbags.rosbag2.errors import ReaderError

    try:
        reader = Reader(bag)
        reader.open()
    except (ReaderError, OSError) as exc:
        raise ReplayError(f"{bag}: cannot read as a rosbag2 ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - the storage plugins raise many unrelated types
        raise ReplayError(f"{bag}: cannot read as a rosbag2 ({type(exc).__name__}: {exc})"
                          ) from None
    return reader


def _selected(bag: str, reader: Any, streams: Mapping[str, str | None],
              topic_map: Mapping[str, str] | None,
              driver_topics: Mapping[str, str] | None) -> dict[str, tuple[str, Any]]:
    """ROS topic -> (stream, connection) of what the replay reads; ReplayError naming the
    bag's topics if nothing, or a wrong type, is selected."""
    from fusion_node.ros2.messages import stream_of

    by_topic = {c.topic: c for c in reader.connections}
    listing = ", ".join(f"{c.topic} ({c.msgtype})" for c in reader.connections) or "none"
    selected: dict[str, tuple[str, Any]] = {}
    if topic_map or driver_topics:
        topic_map = topic_map or {}
        missing = sorted(set(topic_map) - by_topic.keys())
        if missing:
            raise ReplayError(f"{bag}: the launch file's [replay] ros2 table names topic(s) "
                              f"{missing} the bag does not have (it has: {listing})")
        mapped = set(topic_map.values())
        wanted = {t: s for t, s in (driver_topics or {}).items()
                  if t in by_topic and s not in mapped}
        wanted.update(topic_map)
        if not wanted:
            raise ReplayError(f"{bag}: none of the launch file's ros2 driver topics "
                              f"{sorted(driver_topics or {})} is in the bag (it has: {listing}); "
                              "map them in a [replay] table: `ros2 = { \"/cam/image_raw\" = "
                              "\"camera.front\" }`")
    else:
        wanted = {}
        for topic in by_topic:
            try:
                stream, kind = stream_of(topic)
            except ProtocolError:
                continue
            if kind in ("frame", "audio", "joints") and stream in streams:
                wanted[topic] = stream
        if not wanted:
            raise ReplayError(
                f"{bag}: no topic to replay. Map the bag's topics ({listing}) to the launch "
                "file's streams in a [replay] table, e.g. `[replay]` then "
                "`ros2 = { \"/cam/image_raw\" = \"camera.front\" }` (or subscribe to them "
                "with kind = \"ros2\" drivers), and pass --config")
    for topic, stream in wanted.items():
        connection = by_topic[topic]
        input_kind = _INPUT_KINDS.get(connection.msgtype)
        if input_kind is None:
            raise ReplayError(f"{bag}: topic {topic!r} is {connection.msgtype}; replay reads "
                              f"{', '.join(_INPUT_KINDS)}")
        if stream not in streams:
            raise ReplayError(f"{bag}: topic {topic!r} maps to stream {stream!r}, which is not "
                              f"a sensor stream of the launch file ({sorted(streams)})")
        if streams[stream] not in (None, input_kind):
            raise ReplayError(f"{bag}: topic {topic!r} ({connection.msgtype}, {input_kind}) "
                              f"maps to stream {stream!r}, which the launch file declares as "
                              f"{streams[stream]}")
        selected[topic] = (stream, connection)
    return selected


def bag_to_log(bag: str, out_log: str, streams: Mapping[str, str | None],
               topic_map: Mapping[str, str] | None = None,
               driver_topics: Mapping[str, str] | None = None) -> dict[str, int]:
    """Write the bag's mapped input topics into a new fusion-node log at `out_log`; returns
    messages per stream. `streams` are the launch file's sensor streams and their kinds."""
    from fusion_node.ros2.messages import from_ros, typestore

    store = typestore()
    reader = _open_bag(bag)
    counts: Counter[str] = Counter()
    try:
        selected = _selected(bag, reader, streams, topic_map, driver_topics)
        writer = LogWriter(out_log, preview_hz=0, metadata={
            "source": "rosbag2", "rosbag2": os.path.abspath(bag),
            "topic_map": json.dumps({t: s for t, (s, _) in selected.items()})})
        try:
            connections = [c for _, c in selected.values()]
            for connection, bag_ns, raw in reader.messages(connections=connections):
                stream = selected[connection.topic][0]
                where = f"{bag}: {connection.topic!r} message at bag time {bag_ns}"
                try:
                    ros_msg = store.deserialize_cdr(raw, connection.msgtype)
                    msg = from_ros(connection.msgtype, ros_msg, stream, seq=counts[stream])
                except ProtocolError as exc:
                    raise ReplayError(f"{where}: {exc}") from None
                except Exception as exc:  # noqa: BLE001 - CDR decoding raises many types
                    raise ReplayError(f"{where}: does not decode as {connection.msgtype} "
                                      f"({type(exc).__name__}: {exc})") from None
                if msg.t_capture_ns <= 0:
                    raise ReplayError(f"{where}: header stamp is {msg.t_capture_ns} ns; replay "
                                      "needs the publisher's capture stamps")
                # Received when captured: the bag keeps no receive time the node could use.
                msg.t_receive_ns = msg.t_capture_ns
                writer.write(msg, msg.t_capture_ns)
                counts[stream] += 1
        except BaseException:
            writer.abort()
            raise
        writer.close()
    finally:
        reader.close()
    return dict(counts)


def replay_topics(config: Any) -> tuple[dict[str, str], dict[str, str]]:
    """The launch config's `[replay] ros2` table, and its ros2 drivers' topics: ROS topic ->
    stream, each."""
    drivers = {d.config["topic"]: d.stream for d in config.drivers
               if d.kind == "ros2" and isinstance(d.config.get("topic"), str)}
    return dict(config.replay.ros2), drivers


def input_streams(config: Any) -> dict[str, str | None]:
    """The launch config's sensor streams (drivers' and `[[streams]]`) and their kinds (None:
    not known here)."""
    streams: dict[str, str | None] = {d.stream: d.sample_kind for d in config.drivers}
    streams.update({s.name: s.kind for s in config.streams if s.kind != "prediction"})
    return streams
