"""ROS 2 over DDS without a ROS install: Cyclone DDS types made from rosbags' message
definitions, and the bridge that publishes the node's outputs as ROS 2 topics.

ROS 2's default middleware speaks RTPS through Cyclone DDS, so a plain Cyclone participant
that uses ROS 2's naming is a ROS 2 peer: topic `/a/b` is DDS topic `rt/a/b`, and message
type `pkg/msg/Type` is DDS type `pkg::msg::dds_::Type_` with the message's fields in order
(CDR, the same bytes rosbag2 stores). `DdsTypes` builds those IDL types at run time from the
typestore's definitions (`fusion_node.ros2.messages.typestore`), so no definition is retyped
here, and converts between rosbags message objects and their IDL instances.

`DdsBridge` publishes on its own thread from a bounded queue: `offer` never blocks, a full
queue drops (counted), so a slow or stalled ROS 2 subscriber never reaches the node's
real-time path.

    python -m fusion_node.ros2.dds echo TOPIC TYPE [--domain-id N] [--count N] [--json]
    python -m fusion_node.ros2.dds sim-robot [--domain-id N] [--duration S]

`echo` prints what a ROS 2 topic carries; `sim-robot` publishes the simulated camera,
microphone and arm joints as a ROS 2 robot would (sensor_msgs, stamped on the wall clock).
Cyclone reads its configuration from CYCLONEDDS_URI, as ROS 2 does (LOOPBACK_ONLY below keeps
a participant on this host).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from cyclonedds.core import DDSException, Qos
from cyclonedds.domain import DomainParticipant
from cyclonedds.idl import IdlStruct, make_idl_struct
from cyclonedds.idl import types as idl
from cyclonedds.idl._machinery import (
    PlainCdrV2SequenceOfPrimitiveMachine,
    StructMachine,
)
from cyclonedds.pub import DataWriter
from cyclonedds.qos import Policy
from cyclonedds.topic import Topic
from cyclonedds.util import duration
from rosbags.typesys.base import Nodetype
from rosbags.typesys.store import Typestore

from fusion_node.errors import ConfigError, FusionError, ProtocolError
from fusion_node.host.threads import raise_thread_niceness
from fusion_node.logs.recorder import owned
from fusion_node.protocol import Message

log = logging.getLogger(__name__)

# A Cyclone configuration that keeps a participant on this host: loopback only, unicast
# discovery of the other participants' ports there (what ROS 2's ROS_LOCALHOST_ONLY does).
LOOPBACK_ONLY = (
    "<CycloneDDS><Domain Id='any'><General><Interfaces><NetworkInterface name='lo'/>"
    "</Interfaces><AllowMulticast>false</AllowMulticast></General><Discovery>"
    "<ParticipantIndex>auto</ParticipantIndex><MaxAutoParticipantIndex>30"
    "</MaxAutoParticipantIndex><Peers><Peer address='127.0.0.1'/></Peers></Discovery>"
    "</Domain></CycloneDDS>")
# ROS 2 (rmw) limits domain ids to what fits the RTPS port formula with default port gains.
MAX_DOMAIN_ID = 232
TOPIC_PREFIX = "rt"  # ROS 2 topics; services use rq/ and rr/

_BASE = {
    "bool": bool, "byte": idl.byte, "char": idl.uint8, "int8": idl.int8, "uint8": idl.uint8,
    "int16": idl.int16, "uint16": idl.uint16, "int32": idl.int32, "uint32": idl.uint32,
    "int64": idl.int64, "uint64": idl.uint64, "float32": idl.float32, "float64": idl.float64,
}
_NUMPY = {"byte": np.uint8, "char": np.uint8, "int8": np.int8, "uint8": np.uint8,
          "int16": np.int16, "uint16": np.uint16, "int32": np.int32, "uint32": np.uint32,
          "int64": np.int64, "uint64": np.uint64, "float32": np.float32, "float64": np.float64}
# struct codes Cyclone's sequence machine uses, for the numeric ones sent as raw bytes.
_CODE_DTYPE = {"b": np.int8, "B": np.uint8, "h": np.int16, "H": np.uint16, "i": np.int32,
               "I": np.uint32, "q": np.int64, "Q": np.uint64, "f": np.float32, "d": np.float64}


def dds_typename(ros_type: str) -> str:
    """`sensor_msgs/msg/Image` -> `sensor_msgs::msg::dds_::Image_`, ROS 2's DDS type name."""
    package, _, name = ros_type.rpartition("/")
    return f"{package.replace('/', '::')}::dds_::{name}_"


def dds_topic(ros_topic: str) -> str:
    """`/fusion_node/pred/speech` -> `rt/fusion_node/pred/speech`, ROS 2's DDS topic name."""
    if not ros_topic.startswith("/") or ros_topic.endswith("/") or "//" in ros_topic:
        raise ConfigError(f"ROS 2 topic {ros_topic!r} must be absolute (/name/...), without an "
                          "empty part")
    return TOPIC_PREFIX + ros_topic


def check_domain_id(domain_id: Any, where: str) -> int:
    if type(domain_id) is not int or not 0 <= domain_id <= MAX_DOMAIN_ID:
        raise ConfigError(f"{where}: domain_id {domain_id!r} must be an integer from 0 to "
                          f"{MAX_DOMAIN_ID} (ROS_DOMAIN_ID)")
    return domain_id


class _NumericSequenceMachine(PlainCdrV2SequenceOfPrimitiveMachine):
    """A numeric sequence as one block of bytes, to and from a numpy array: the CDR bytes
    are those of Cyclone's own machine, but a 640x480 image takes 1 ms instead of 30."""

    def __init__(self, code: str, max_length: int | None) -> None:
        dtype = np.dtype(_CODE_DTYPE[code])
        self.code, self.alignment, self.size = code, dtype.itemsize, dtype.itemsize
        self.max_length = max_length
        self._dtype = dtype

    def serialize(self, buffer: Any, value: Any, *args: Any, **kwargs: Any) -> None:
        array = np.ascontiguousarray(value, dtype=self._dtype.newbyteorder(buffer._endian))
        if array.ndim != 1 or (self.max_length and len(array) > self.max_length):
            raise ValueError(f"sequence of {len(array)} values is not 1-D within its bound "
                             f"{self.max_length}")
        buffer.align(4)
        buffer.write("I", 4, len(array))
        if len(array):
            buffer.align(self.alignment)
            buffer.write_bytes(array.tobytes())

    def deserialize(self, buffer: Any, *args: Any, **kwargs: Any) -> np.ndarray:
        buffer.align(4)
        length = buffer.read("I", 4)
        if not length:
            return np.zeros(0, self._dtype)
        buffer.align(self.alignment)
        raw = buffer.read_bytes(length * self.size)
        if len(raw) != length * self.size:
            raise ValueError(f"sequence of {length} values truncated")
        return np.frombuffer(raw, self._dtype.newbyteorder(buffer._endian)).astype(
            self._dtype, copy=False)

    def default_initialize(self) -> np.ndarray:
        return np.zeros(0, self._dtype)


def _fast_sequences(cls: type[IdlStruct]) -> None:
    """Swap Cyclone's per-element machines for numeric sequences for `_NumericSequenceMachine`
    (the type, and so what it says in discovery, is unchanged)."""
    cls.__idl__.populate()
    for machine in (cls.__idl__.v1_machine, cls.__idl__.v2_machine):
        if not isinstance(machine, StructMachine):  # appendable/mutable: left as Cyclone has it
            continue
        for name, member in machine.members_machines.items():
            if (type(member) is PlainCdrV2SequenceOfPrimitiveMachine
                    and member.code in _CODE_DTYPE):
                machine.members_machines[name] = _NumericSequenceMachine(member.code,
                                                                         member.max_length)


class DdsTypes:
    """Cyclone IDL types for the typestore's ROS 2 messages, built on first use, and the
    conversions between rosbags message objects and instances of them."""

    def __init__(self, store: Typestore) -> None:
        self._store = store
        self._classes: dict[str, type[IdlStruct]] = {}
        self._lock = threading.Lock()

    def idl(self, ros_type: str) -> type[IdlStruct]:
        """The IDL struct of `ros_type` (`pkg/msg/Type`), its nested types built with it."""
        with self._lock:
            return self._idl(ros_type)

    def _idl(self, ros_type: str) -> type[IdlStruct]:
        cls = self._classes.get(ros_type)
        if cls is not None:
            return cls
        if ros_type not in self._store.fielddefs:
            raise ConfigError(f"ROS 2 type {ros_type!r} is not in the typestore (known "
                              "packages include sensor_msgs, std_msgs, diagnostic_msgs and "
                              "fusion_node_msgs)")
        _, fields = self._store.fielddefs[ros_type]
        members = {name: self._member(ros_type, name, desc) for name, desc in fields}
        cls = make_idl_struct(ros_type.replace("/", "__"), dds_typename(ros_type), members)
        _fast_sequences(cls)
        self._classes[ros_type] = cls
        return cls

    def _member(self, ros_type: str, name: str, desc: tuple[Any, Any]) -> Any:
        node, detail = desc
        if node == Nodetype.BASE:
            base, bound = detail
            if base == "string":
                return idl.bounded_str[bound] if bound else str  # type: ignore[misc]
            if base not in _BASE:
                raise ConfigError(f"ROS 2 type {ros_type!r}: field {name!r} is {base!r}, which "
                                  "this bridge does not map to DDS")
            return _BASE[base]
        if node == Nodetype.NAME:
            return self._idl(detail)
        inner, size = detail
        element = self._member(ros_type, name, inner)
        if node == Nodetype.ARRAY:
            return idl.array[element, size]  # type: ignore[misc]
        return (idl.sequence[element, size] if size  # type: ignore[misc]
                else idl.sequence[element])  # type: ignore[misc]

    def to_dds(self, msg: Any, ros_type: str) -> IdlStruct:
        """The IDL instance of rosbags message `msg` of `ros_type`."""
        cls = self.idl(ros_type)
        _, fields = self._store.fielddefs[ros_type]
        return cls(**{name: self._to(getattr(msg, name), desc) for name, desc in fields})

    def _to(self, value: Any, desc: tuple[Any, Any]) -> Any:
        node, detail = desc
        if node == Nodetype.BASE:
            return value
        if node == Nodetype.NAME:
            return self.to_dds(value, detail)
        (inner_node, inner), _ = detail
        if inner_node == Nodetype.NAME:
            return [self.to_dds(v, inner) for v in value]
        base = inner[0]
        if node == Nodetype.SEQUENCE and base in _NUMPY:
            return np.asarray(value, dtype=_NUMPY[base])  # sent as bytes, see above
        if node == Nodetype.ARRAY and base in ("uint8", "byte", "char"):
            return bytes(np.asarray(value, dtype=np.uint8))  # Cyclone's octet arrays
        if isinstance(value, np.ndarray):
            return value.tolist()
        return list(value)

    def from_dds(self, sample: Any, ros_type: str) -> Any:
        """The rosbags message object of `ros_type` that IDL instance `sample` holds."""
        _, fields = self._store.fielddefs[ros_type]
        return self._store.types[ros_type](
            **{name: self._from(getattr(sample, name), desc) for name, desc in fields})

    def _from(self, value: Any, desc: tuple[Any, Any]) -> Any:
        node, detail = desc
        if node == Nodetype.BASE:
            return value
        if node == Nodetype.NAME:
            return self.from_dds(value, detail)
        (inner_node, inner), _ = detail
        if inner_node == Nodetype.NAME:
            return [self.from_dds(v, inner) for v in value]
        base = inner[0]
        if base in _NUMPY:  # rosbags holds numeric arrays as numpy arrays
            if isinstance(value, (bytes, bytearray)):
                return np.frombuffer(value, np.uint8)
            return np.asarray(value, dtype=_NUMPY[base])
        if base == "bool":
            return np.asarray(value, dtype=np.bool_)
        return list(value)


# -- QoS -----------------------------------------------------------------------------------

def default_qos(depth: int = 10) -> Qos:
    """ROS 2's default profile (rmw_qos_profile_default): reliable, volatile, keep last 10.
    A write may block at most 100 ms (rmw_cyclonedds' setting) and only ever the bridge's
    own thread."""
    return Qos(Policy.Reliability.Reliable(max_blocking_time=duration(milliseconds=100)),
               Policy.Durability.Volatile, Policy.History.KeepLast(depth))


def sensor_data_qos(depth: int = 5) -> Qos:
    """ROS 2's sensor data profile (rmw_qos_profile_sensor_data): best effort, volatile, keep
    last 5. A best-effort reader also matches reliable writers."""
    return Qos(Policy.Reliability.BestEffort, Policy.Durability.Volatile,
               Policy.History.KeepLast(depth))


# -- the bridge ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BridgeTopic:
    """A node stream published as ROS 2 topic `ros_topic` of `ros_type`."""

    stream: str
    ros_topic: str
    ros_type: str
    sensor: bool = False  # sensor data QoS (best effort) instead of the default profile


class DdsBridge:
    """Publishes node messages as ROS 2 topics on a DDS domain, from its own thread.

    `offer` is what the node's threads call: it appends to a bounded queue and returns at
    once; a full queue drops the offered message and counts it (`stats`). Conversion,
    serialisation and the DDS write (which may block up to 100 ms on a reliable topic whose
    reader does not acknowledge) all happen on the bridge's thread.
    """

    def __init__(self, domain_id: int, topics: Iterable[BridgeTopic], *, queue_size: int = 64,
                 to_ros: Callable[[Message, str], Any] | None = None,
                 types: DdsTypes | None = None, stamp_offset_ns: int = 0) -> None:
        from fusion_node.ros2 import messages

        self.domain_id = check_domain_id(domain_id, "ros2")
        self.topics = {t.stream: t for t in topics}
        self._queue: deque[Message] = deque()
        self._queue_size = queue_size
        self._changed = threading.Condition()
        self._stopping = False
        self._to_ros = to_ros or messages.to_ros
        self._shifted = messages.shifted
        # Added to every instant published: the wall clock's offset, so ROS 2 sees ROS time.
        self.stamp_offset_ns = stamp_offset_ns
        self._types = types or DdsTypes(messages.typestore())
        self._participant: DomainParticipant | None = None
        self._writers: dict[str, DataWriter] = {}
        self._thread: threading.Thread | None = None
        self.published: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.unread: Counter[str] = Counter()  # sensor messages skipped: no reader matched
        self.last_error = ""
        self.max_write_ns = 0
        self.max_queued = 0
        self.priority = "default"

    def start(self) -> None:
        """Join the domain, create every topic's writer (so ROS 2 tools see them before the
        first message), and start the publishing thread."""
        for topic in self.topics.values():
            self._types.idl(topic.ros_type)  # a bad type fails here, before anything runs
        try:
            self._participant = DomainParticipant(self.domain_id)
            for topic in self.topics.values():
                dds_type = self._types.idl(topic.ros_type)
                self._writers[topic.stream] = DataWriter(
                    self._participant, Topic(self._participant, dds_topic(topic.ros_topic),
                                             dds_type),
                    qos=sensor_data_qos() if topic.sensor else default_qos())
        except DDSException as exc:  # no usable interface, a bad CYCLONEDDS_URI
            self._writers.clear()
            self._participant = None
            raise FusionError(f"ros2: cannot publish on DDS domain {self.domain_id} ({exc}); "
                              "check CYCLONEDDS_URI") from None
        self._thread = threading.Thread(target=self.run_blocking, name="ros2 bridge",
                                        daemon=True)
        self._thread.start()

    def offer(self, msg: Message) -> bool:
        """Queue `msg` for its topic; False if it has none or the queue is full (counted)."""
        topic = self.topics.get(msg.stream)
        if topic is None:
            return False
        if topic.sensor:
            msg = owned(msg)  # type: ignore[assignment]  # the recorder's copy rule
        with self._changed:
            if self._stopping:
                return False
            if len(self._queue) >= self._queue_size:
                self.dropped[msg.stream] += 1
                return False
            self._queue.append(msg)
            self.max_queued = max(self.max_queued, len(self._queue))
            self._changed.notify()
        return True

    def run_blocking(self) -> None:
        """Publish what is offered until stopped; what is queued at stop is still sent."""
        # As the recorder's thread: a GIL holder pre-empted by other processes would delay
        # the real-time engines waiting for it.
        self.priority = raise_thread_niceness()
        while True:
            with self._changed:
                while not self._queue and not self._stopping:
                    self._changed.wait(0.1)
                if not self._queue:
                    return
                msg = self._queue.popleft()
            self._write(msg)

    def _write(self, msg: Message) -> None:
        topic = self.topics[msg.stream]
        writer = self._writers[msg.stream]
        try:
            if topic.sensor and not writer.get_publication_matched_status().current_count:
                # A frame costs milliseconds to convert; with no reader (and volatile
                # durability, so no later reader either) there is no one to convert it for.
                self.unread[msg.stream] += 1
                return
            if self.stamp_offset_ns:
                msg = self._shifted(msg, self.stamp_offset_ns)
            sample = self._types.to_dds(self._to_ros(msg, topic.ros_type), topic.ros_type)
            started_ns = time.monotonic_ns()
            writer.write(sample)
            self.max_write_ns = max(self.max_write_ns, time.monotonic_ns() - started_ns)
            self.published[msg.stream] += 1
        except Exception as exc:  # noqa: BLE001 - one bad message must not stop the bridge
            self.errors[msg.stream] += 1
            self.last_error = f"{msg.stream} -> {topic.ros_topic}: {exc}"
            if self.errors[msg.stream] == 1:
                log.warning("ros2 bridge: %s", self.last_error)

    def stop(self) -> None:
        """Stop accepting, send what is queued, leave the domain; idempotent."""
        with self._changed:
            self._stopping = True
            self._changed.notify()
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None
        self._writers.clear()
        self._participant = None  # Cyclone deletes the entities with the last reference

    def stats(self) -> dict[str, Any]:
        """For node.health: per stream published, dropped (queue full), failed and unread
        (sensor messages no reader was matched for) messages, the current and peak queue,
        the slowest DDS write, and matched ROS 2 readers."""
        matched = {}
        for stream, writer in list(self._writers.items()):
            try:
                matched[stream] = writer.get_publication_matched_status().current_count
            except DDSException:  # a writer being deleted at shutdown
                matched[stream] = None
        return {"domain_id": self.domain_id, "stamps": "wall" if self.stamp_offset_ns
                else "monotonic", "topics": {s: t.ros_topic for s, t in self.topics.items()},
                "published": dict(self.published), "dropped": dict(self.dropped),
                "errors": dict(self.errors), "unread": dict(self.unread),
                "last_error": self.last_error,
                "queued": len(self._queue), "max_queued": self.max_queued,
                "queue_size": self._queue_size, "matched_readers": matched,
                "max_write_ms": round(self.max_write_ns / 1e6, 3), "priority": self.priority}


# -- command line: echo a ROS 2 topic, or be a simulated ROS 2 robot ---------------------------

def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= 64 else f"<{value.dtype} x {value.size}>"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.name != "__msgtype__"}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def echo_blocking(topic: str, ros_type: str, domain_id: int, count: int | None,
                  timeout_s: float, reliable: bool = False, out: Any = sys.stdout) -> int:
    """Print `count` messages of ROS 2 `topic` (JSON lines: topic, type, message); 0 if all
    came within `timeout_s`, else 1. Best effort by default, which matches any publisher."""
    from cyclonedds.core import InstanceState, ReadCondition, SampleState, ViewState, WaitSet
    from cyclonedds.internal import InvalidSample
    from cyclonedds.sub import DataReader

    from fusion_node.ros2 import messages

    types = DdsTypes(messages.typestore())
    participant = DomainParticipant(check_domain_id(domain_id, "--domain-id"))
    reader = DataReader(participant, Topic(participant, dds_topic(topic), types.idl(ros_type)),
                        qos=default_qos() if reliable else sensor_data_qos(10))
    condition = ReadCondition(reader, SampleState.Any | ViewState.Any | InstanceState.Any)
    waitset = WaitSet(participant)
    waitset.attach(condition)
    seen = 0
    deadline = time.monotonic() + timeout_s
    while (count is None or seen < count) and time.monotonic() < deadline:
        waitset.wait(duration(milliseconds=100))
        for sample in reader.take(16):
            if isinstance(sample, InvalidSample):  # an instance's state changed: no data
                continue
            msg = types.from_dds(sample, ros_type)
            print(json.dumps({"topic": topic, "type": ros_type, "msg": _jsonable(msg)}),
                  file=out, flush=True)
            seen += 1
    return 0 if count is None or seen >= count else 1


async def _sim_robot(domain_id: int, duration_s: float | None) -> None:
    """The simulated camera, microphone and arm joints as a ROS 2 robot publishes them:
    sensor_msgs on /camera/front/image_raw, /audio/mic0/audio and /joints/arm/joint_states,
    stamped on this host's wall clock (ROS time), sensor data QoS."""
    from drivers.registry import create_driver
    from fusion_node.clock import MonotonicClock, measure_wall_clock
    from fusion_node.ros2 import messages

    clock = MonotonicClock()
    wall = measure_wall_clock()
    drivers = [create_driver(kind, stream, {}, clock) for kind, stream in
               (("sim_camera", "camera.front"), ("sim_microphone", "audio.mic0"),
                ("sim_joints", "joints.arm"))]
    topics = [(d.stream, messages.ros_topic(d.stream, kind))
              for d, kind in zip(drivers, ("frame", "audio", "joints"), strict=True)]
    bridge = DdsBridge(domain_id, [BridgeTopic(stream, topic.name, topic.type, sensor=True)
                                   for stream, topic in topics], queue_size=256)
    bridge.start()

    async def pump(driver: Any) -> None:
        await driver.connect()
        try:
            while True:
                sample = await driver.recv()
                # A ROS driver stamps with ROS time: here, the wall clock at capture.
                sample.t_capture_ns = wall.to_wall_ns(sample.t_capture_ns)
                bridge.offer(sample)
        finally:
            await driver.disconnect()

    try:
        async with asyncio.timeout(duration_s):
            async with asyncio.TaskGroup() as tasks:
                for driver in drivers:
                    tasks.create_task(pump(driver), name=f"sim {driver.stream}")
    except TimeoutError:
        pass
    finally:
        bridge.stop()
        print(json.dumps({"published": dict(bridge.published), "dropped": dict(bridge.dropped),
                          "errors": dict(bridge.errors)}), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusion_node.ros2.dds")
    commands = parser.add_subparsers(dest="command", required=True)
    echo = commands.add_parser("echo", help="print a ROS 2 topic's messages as JSON lines")
    echo.add_argument("topic", help="ROS 2 topic, e.g. /fusion_node/pred/speech")
    echo.add_argument("type", help="message type, e.g. fusion_node_msgs/msg/SpeechPrediction")
    echo.add_argument("--count", type=int, default=None)
    echo.add_argument("--timeout-s", type=float, default=30.0)
    echo.add_argument("--reliable", action="store_true",
                      help="a reliable reader (matches reliable publishers only)")
    sim = commands.add_parser("sim-robot", help="publish simulated sensors as ROS 2 topics")
    sim.add_argument("--duration-s", type=float, default=None)
    for sub in (echo, sim):
        sub.add_argument("--domain-id", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.command == "echo":
            return echo_blocking(args.topic, args.type, args.domain_id, args.count,
                                 args.timeout_s, args.reliable)
        asyncio.run(_sim_robot(args.domain_id, args.duration_s))
    except (FusionError, ProtocolError) as exc:
        print(f"fusion_node.ros2.dds: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
