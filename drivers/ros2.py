"""Samples from a ROS 2 topic (sensor_msgs/Image, sensor_msgs/JointState, or
fusion_node_msgs/AudioChunk), read over DDS by a plain Cyclone participant: no ROS install.

The message's header stamp is its capture time. ROS 2 stamps with ROS time, which is the wall
clock unless the robot simulates time; `stamp_clock = "wall"` maps it onto
the node's monotonic clock through a wall-clock reading re-measured every 100 ms, whose
uncertainty is the reading's bracket plus `clock_uncertainty_ms` (how far the publisher's
host's wall clock may be from this one's: its NTP or PTP error; 0 on this host).
`stamp_clock = "monotonic"` takes stamps already on this host's CLOCK_MONOTONIC.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

from drivers.base import Sample
from fusion_node.clock import Clock, measure_wall_clock
from fusion_node.errors import ConfigError, DriverError, EndOfStream, ProtocolError
from fusion_node.protocol import AudioChunk, Frame, JointState
from fusion_node.remote_clock import ClockMapping

log = logging.getLogger(__name__)

# Message types this driver reads, and the sample kind each becomes.
TYPES = {"sensor_msgs/msg/Image": "frame", "sensor_msgs/msg/JointState": "joints",
         "fusion_node_msgs/msg/AudioChunk": "audio"}
STAMP_CLOCKS = ("wall", "monotonic")
_POLL_MS = 50  # bounds how long disconnect waits for a receive in progress
_REMEASURE_NS = 100_000_000
# How fast the wall clock may move against the monotonic one between two readings: the
# kernel's slew limit for NTP adjustments (500 ppm); a step shows at the next reading.
_WALL_SLEW = 500e-6


@dataclass(frozen=True, slots=True)
class Ros2SubscriberConfig:
    """Subscribe to ROS 2 `topic` of `type` on DDS domain `domain_id` (ROS_DOMAIN_ID).

    `reliable = false` (best effort, what sensor_msgs publishers mostly offer) matches both
    best-effort and reliable publishers; `depth` is the reader's history (keep last).
    `timeout_ms` without a valid message is a fault.
    """

    stream: str
    topic: str
    type: str
    domain_id: int = 0
    stamp_clock: str = "wall"
    clock_uncertainty_ms: float = 0.0
    reliable: bool = False
    depth: int = 10
    timeout_ms: float = 2000.0

    def __post_init__(self) -> None:
        where = f"ros2 driver for stream {self.stream!r}"
        try:
            from fusion_node.ros2.dds import check_domain_id, dds_topic
        except ImportError as exc:
            raise ConfigError(f"{where}: needs the [ros2] extra (cyclonedds, rosbags): "
                              f"{exc}") from None
        if self.type not in TYPES:
            raise ConfigError(f"{where}: type {self.type!r} is not one of {sorted(TYPES)}")
        dds_topic(self.topic)  # raises ConfigError naming a malformed topic
        check_domain_id(self.domain_id, where)
        if self.stamp_clock not in STAMP_CLOCKS:
            raise ConfigError(f"{where}: stamp_clock {self.stamp_clock!r} is not one of "
                              f"{STAMP_CLOCKS}")
        if self.clock_uncertainty_ms < 0 or self.timeout_ms <= 0 or self.depth < 1:
            raise ConfigError(f"{where}: clock_uncertainty_ms must be >= 0, timeout_ms > 0 "
                              f"and depth >= 1 (got {self.clock_uncertainty_ms}, "
                              f"{self.timeout_ms}, {self.depth})")


def wall_clock_mapping(clock_uncertainty_ms: float = 0.0) -> ClockMapping:
    """ROS time (this host's wall clock, or a host synchronised to it within
    `clock_uncertainty_ms`) as a remote clock of the monotonic one."""
    wall = measure_wall_clock()
    return ClockMapping(t_ref_local_ns=wall.monotonic_ns,
                        offset_ns=wall.wall_ns - wall.monotonic_ns, drift=0.0,
                        uncertainty_ns=wall.uncertainty_ns + round(clock_uncertainty_ms * 1e6),
                        samples=1, min_rtt_ns=2 * wall.uncertainty_ns, drift_wander=_WALL_SLEW)


def clock_summary(config: dict[str, Any], now_ns: int) -> dict[str, Any]:
    """What node.health says of a ros2 stream's clock (the driver runs in its own process;
    this is the same mapping measured in the node's)."""
    if config.get("stamp_clock", "wall") == "monotonic":
        return {"source": "ros2 monotonic", "uncertainty_ms": 0.0}
    mapping = wall_clock_mapping(float(config.get("clock_uncertainty_ms", 0.0)))
    return {"source": "ros2 wall clock", **mapping.summary(now_ns)}


class Ros2Subscriber:
    """Reads one ROS 2 topic; counts what it rejects in `rejected`.

    Rejection reasons: `malformed` (the message does not convert: its error is logged once
    and kept in `last_rejection`), `no_stamp` (header stamp 0: never set), `not_monotonic`
    (stamp not after the previous message's), `names_changed` (joint names differ from the
    first state's).
    """

    def __init__(self, config: Ros2SubscriberConfig, clock: Clock) -> None:
        self.config = config
        self.stream = config.stream
        self._clock = clock
        self._timeout_ns = round(config.timeout_ms * 1e6)
        self._lock = threading.Lock()  # one receive at a time; disconnect waits for it
        self._stop = threading.Event()
        self.rejected: Counter[str] = Counter()
        self.last_rejection = ""
        self._pending: list[Any] = []
        self._reader: Any = None
        self._waitset: Any = None
        self._participant: Any = None
        self._types: Any = None
        self._mapping: ClockMapping | None = None
        self._names: tuple[str, ...] | None = None
        self._last_stamp_ns: int | None = None
        self._seq = 0

    @property
    def _name(self) -> str:
        return f"ros2 {self.config.topic!r} ({self.stream})"

    async def connect(self) -> None:
        await asyncio.to_thread(self._connect_blocking)

    def _connect_blocking(self) -> None:
        from cyclonedds.core import (
            DDSException,
            InstanceState,
            ReadCondition,
            SampleState,
            ViewState,
            WaitSet,
        )
        from cyclonedds.domain import DomainParticipant
        from cyclonedds.sub import DataReader
        from cyclonedds.topic import Topic

        from fusion_node.ros2 import messages
        from fusion_node.ros2.dds import DdsTypes, dds_topic, default_qos, sensor_data_qos

        self._stop.clear()
        self._types = DdsTypes(messages.typestore())
        try:
            self._participant = DomainParticipant(self.config.domain_id)
            qos = default_qos(self.config.depth) if self.config.reliable else sensor_data_qos(
                self.config.depth)
            self._reader = DataReader(self._participant, Topic(
                self._participant, dds_topic(self.config.topic), self._types.idl(self.config.type)),
                qos=qos)
            self._waitset = WaitSet(self._participant)
            self._waitset.attach(ReadCondition(
                self._reader, SampleState.Any | ViewState.Any | InstanceState.Any))
        except DDSException as exc:  # no usable interface, a bad CYCLONEDDS_URI
            raise DriverError(f"{self._name}: cannot join DDS domain {self.config.domain_id}: "
                              f"{exc}") from None

    async def recv(self) -> Sample:
        return await asyncio.to_thread(self._recv_blocking)

    def _recv_blocking(self) -> Sample:
        from cyclonedds.internal import InvalidSample
        from cyclonedds.util import duration

        with self._lock:
            if self._reader is None:
                raise DriverError(f"{self._name} is not connected")
            deadline_ns = self._clock.now_ns() + self._timeout_ns
            while not self._stop.is_set():
                while self._pending:
                    sample = self._accept(self._pending.pop(0))
                    if sample is not None:
                        return sample
                self._waitset.wait(duration(milliseconds=_POLL_MS))
                try:
                    # Invalid samples only say an instance changed state (its publisher left).
                    self._pending = [s for s in self._reader.take(16)
                                     if not isinstance(s, InvalidSample)]
                except Exception as exc:  # noqa: BLE001 - Cyclone could not decode the bytes
                    self._reject("malformed", f"undecodable sample: {exc}")
                if self._clock.now_ns() >= deadline_ns and not self._pending:
                    raise DriverError(f"{self._name}: no valid {self.config.type} for "
                                      f"{self.config.timeout_ms} ms")
            raise EndOfStream(f"{self._name} disconnected")

    def _reject(self, reason: str, detail: str) -> None:
        self.rejected[reason] += 1
        self.last_rejection = f"{self._name}: {detail}"
        if self.rejected[reason] == 1:  # once per reason: a bad publisher floods otherwise
            log.warning("%s (dropped; counted as %s)", self.last_rejection, reason)

    def _accept(self, dds_sample: Any) -> Sample | None:
        from fusion_node.ros2 import messages

        try:
            ros_msg = self._types.from_dds(dds_sample, self.config.type)
            sample = messages.from_ros(self.config.type, ros_msg, self.stream, seq=self._seq)
        except (ProtocolError, ValueError, TypeError) as exc:
            self._reject("malformed", str(exc))
            return None
        if not isinstance(sample, (Frame, AudioChunk, JointState)):  # TYPES are sensors only
            raise DriverError(f"{self._name}: {self.config.type} gave a {type(sample).__name__}")
        stamp_ns = sample.t_capture_ns
        if stamp_ns <= 0:
            self._reject("no_stamp", f"header.stamp is {stamp_ns} ns: the publisher never set "
                         "it, so there is no capture time")
            return None
        if self._last_stamp_ns is not None and stamp_ns <= self._last_stamp_ns:
            self._reject("not_monotonic", f"stamp {stamp_ns} ns is not after the previous "
                         f"{self._last_stamp_ns} ns")
            return None
        if isinstance(sample, JointState):
            names = sample.names
            if self._names is None:
                self._names = names
            elif names != self._names:
                self._reject("names_changed", f"joint names {list(names)} differ from the "
                             f"first message's {list(self._names)}")
                return None
        self._last_stamp_ns = stamp_ns
        sample.t_capture_ns = self._to_local_ns(stamp_ns)
        self._seq += 1
        return sample

    def _to_local_ns(self, stamp_ns: int) -> int:
        if self.config.stamp_clock == "monotonic":
            return stamp_ns
        now_ns = self._clock.now_ns()
        mapping = self._mapping
        if mapping is None or now_ns - mapping.t_ref_local_ns > _REMEASURE_NS:
            # Re-read often: ROS time follows NTP's slews and steps, the monotonic clock not.
            mapping = self._mapping = wall_clock_mapping(self.config.clock_uncertainty_ms)
        return mapping.to_local_ns(stamp_ns)

    async def disconnect(self) -> None:
        self._stop.set()
        await asyncio.to_thread(self._close_blocking)

    def _close_blocking(self) -> None:
        with self._lock:  # a receive in progress sees the stop flag within one poll
            self._waitset = self._reader = self._participant = None
            if self.rejected:
                log.info("%s: rejected %s; last: %s", self._name, dict(self.rejected),
                         self.last_rejection)
