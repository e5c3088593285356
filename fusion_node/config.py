"""Launch files: TOML data describing drivers, engines, rates, latencies and endpoints.

Durations are written in `_ms` / `_s` and converted to integer ns here, once.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from drivers.registry import check_driver_config
from engines.backends import BACKENDS, PRECISIONS
from engines.spec import load_spec_table, parse_spec
from fusion_node.alignment import DEFAULT_MAX_FUTURE_NS
from fusion_node.errors import ConfigError
from fusion_node.host.supervisor import RestartPolicy
from fusion_node.tables import Table
from fusion_node.transport import DEFAULT_PUB

# Per-kind ring sizes: about 2 s of each default stream, and ~60 MB of 640x480 frames.
DEFAULT_CAPACITY = {"frame": 64, "audio": 256, "joints": 512, "prediction": 64}
DRIVER_KIND_TO_SAMPLE = {
    "camera": "frame", "sim_camera": "frame",
    "microphone": "audio", "wav": "audio", "sim_microphone": "audio",
    "joints_zmq": "joints", "sim_joints": "joints", "sim_arm": "joints",
}
# Drivers whose sample kind follows their config: a ros2 driver's message type.
DRIVER_KINDS = (*sorted(DRIVER_KIND_TO_SAMPLE), "ros2")
BINDINGS = ("speech", "action", "spec")


@dataclass(frozen=True)
class DriverConfig:
    kind: str
    stream: str
    process: bool
    endpoint: str | None
    config: dict[str, Any]
    capacity: int
    # Large payloads through a shared-memory ring (protocol.md §10); off for subscribers
    # that cannot map it: another host, or a client without the extension.
    shared_memory: bool = True

    @property
    def sample_kind(self) -> str:
        """frame, audio or joints: what this driver's stream carries."""
        return driver_sample_kind(self.kind, self.stream, self.config)


def driver_sample_kind(kind: str, stream: str, config: Any) -> str:
    if kind != "ros2":
        return DRIVER_KIND_TO_SAMPLE[kind]
    from drivers.ros2 import TYPES

    ros_type = config.get("type") if isinstance(config, dict) else None
    if ros_type not in TYPES:
        raise ConfigError(f"ros2 driver for stream {stream!r}: config.type {ros_type!r} is not "
                          f"one of {sorted(TYPES)}")
    return TYPES[ros_type]


@dataclass(frozen=True)
class StreamConfig:
    """A stream published by something that already speaks the protocol (a robot
    controller, another node): no driver, the node subscribes to it directly."""

    name: str
    kind: str
    capacity: int
    # A source on its own clock: the endpoint of its `fusion_node.remote_clock` responder;
    # its stamps are mapped onto the node's clock (DESIGN §2).
    clock: str | None = None


@dataclass(frozen=True)
class EngineConfig:
    name: str
    binding: str
    model: str
    topic: str
    rate_hz: float
    latency_ns: int
    align_delay_ns: int
    inputs: dict[str, str]
    params: dict[str, Any]
    intra_op_threads: int
    # "auto": TensorRT where usable, else ONNX Runtime (engines.backends).
    backend: str = "auto"
    precision: str = "fp16"  # GPU backends only; the CPU runs the file's fp32
    calibration: str | None = None  # TensorRT int8 calibration set (.npz)
    spec: dict[str, Any] | None = None  # the engine spec table when `binding` is "spec"


# A driver config value that stands for the node's own publish endpoint (node.pub, or --pub,
# as bound): what the simulated arm follows.
NODE_PUB = "node.pub"


@dataclass(frozen=True)
class RecordConfig:
    """The launch file's `[record]` table: record to an MCAP log while the node runs."""

    path: str
    topics: tuple[str, ...] = ()  # topic names or prefixes ending in '.'; empty: all
    duration_ns: int | None = None  # stop recording after this long; None: until shutdown
    compression: str = "lz4"
    preview_hz: float = 10.0  # Foxglove camera preview rate; 0: no previews
    chunk_size: int = 1 << 20  # a crash loses at most the chunk in memory...
    flush_interval_ns: int = 1_000_000_000  # ...and at most this much time of it
    overwrite: bool = False  # replace an existing log at `path` (the CLI's --force)


@dataclass(frozen=True)
class ViewConfig:
    """The launch file's `[view]` table: live views served by the node while it runs."""

    # The Foxglove WebSocket server's (host, port) (fusion_node.view.foxglove_live); None:
    # no server.
    foxglove: tuple[str, int] | None = None


@dataclass(frozen=True)
class ReplayConfig:
    """The launch file's `[replay]` table: how `fusion-node replay` reads a foreign log."""

    # A rosbag2's topics and the sensor streams they replay as, e.g.
    # {"/cam/image_raw": "camera.front"}; empty: topics named by fusion-node's own rule
    # (fusion_node.ros2.messages.ros_topic), as `log export --ros2` writes them.
    ros2: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Ros2Config:
    """The launch file's `[ros2]` table: publish the node's outputs as ROS 2 topics over DDS
    (fusion_node.ros2.dds), on its own thread, never on the real-time path."""

    publish: bool = False
    domain_id: int = 0  # ROS_DOMAIN_ID
    sensors: bool = False  # also the sensor streams (Image, AudioChunk, JointState)
    queue_size: int = 64  # messages waiting for DDS; beyond it they are dropped, counted


@dataclass(frozen=True)
class NodeConfig:
    pub: str
    run_dir: str | None
    health_period_ns: int
    startup_timeout_ns: int
    drivers: tuple[DriverConfig, ...]
    engines: tuple[EngineConfig, ...]
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    connect: tuple[str, ...] = ()
    streams: tuple[StreamConfig, ...] = ()
    record: RecordConfig | None = None
    calibration: str | None = None  # the robot's calibration.yaml (calibration/README.md)
    # CurveZMQ (docs/security.md): the node's .key_secret and the directory of client .key
    # files it admits; required to bind or connect beyond loopback. Absolute paths.
    server_secret_key: str | None = None
    allowed_clients: str | None = None
    # How far after its receipt a sample may be stamped before it is refused (`too_new`).
    max_future_ns: int = DEFAULT_MAX_FUTURE_NS
    view: ViewConfig = field(default_factory=ViewConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    ros2: Ros2Config = field(default_factory=Ros2Config)

    def capacities(self) -> dict[str, int]:
        capacities = {d.stream: d.capacity for d in self.drivers}
        capacities.update({s.name: s.capacity for s in self.streams})
        capacities.update({e.topic: DEFAULT_CAPACITY["prediction"] for e in self.engines})
        return capacities


def _driver(data: Any, index: int) -> DriverConfig:
    table = Table(data, f"drivers[{index}]")
    kind = table.choice("kind", DRIVER_KINDS)
    stream = table.get("stream", str)
    config = table.get("config", dict, {})
    driver = DriverConfig(
        kind=kind, stream=stream, process=table.get("process", bool, True),
        endpoint=table.get("endpoint", str, None), config=config,
        capacity=table.get("buffer_capacity", int,
                           DEFAULT_CAPACITY[driver_sample_kind(kind, stream, config)]),
        shared_memory=table.get("shared_memory", bool, True))
    table.done()
    return driver


def _stream(data: Any, index: int) -> StreamConfig:
    table = Table(data, f"streams[{index}]")
    kind = table.choice("kind", tuple(sorted(DEFAULT_CAPACITY)))
    stream = StreamConfig(table.get("name", str), kind,
                          table.get("buffer_capacity", int, DEFAULT_CAPACITY[kind]),
                          table.get("clock", str, None))
    if stream.clock is not None and kind == "prediction":
        raise ConfigError(f"streams[{index}]: clock applies to sensor streams, not "
                          f"{kind!r} streams")
    table.done()
    return stream


def _engine(data: Any, index: int) -> EngineConfig:
    table = Table(data, f"engines[{index}]")
    name = table.get("name", str)
    where = f"engine {name!r}"
    # A user's model is bound by an engine spec (inline table or TOML file), no code.
    spec_value = table.get("spec", (str, dict), None)
    binding = table.get("binding", str, "spec" if spec_value is not None else ...)
    binding = table.one_of("binding", binding, BINDINGS,
                           f"{where}: binding {binding!r} is not one of {BINDINGS}")
    if (binding == "spec") != (spec_value is not None):
        raise ConfigError(f"{where}: give either `spec` (an engine spec) or a built-in "
                          f"binding {BINDINGS[:-1]}")
    spec = load_spec_table(spec_value, where) if spec_value is not None else None
    engine = EngineConfig(
        name=name, binding=binding, model=table.get("model", str),
        topic=table.get("topic", str), rate_hz=table.get("rate_hz", float),
        latency_ns=table.ms("latency_ms"), align_delay_ns=table.ms("align_delay_ms"),
        inputs=table.get("inputs", dict), params=table.get("params", dict, {}),
        intra_op_threads=table.get("intra_op_threads", int, 1),
        backend=table.get("backend", str, "auto"), precision=table.get("precision", str, "fp16"),
        calibration=table.get("calibration", str, None), spec=spec)
    table.done()
    for role, stream in engine.inputs.items():
        if not isinstance(stream, str):
            raise ConfigError(f"{where}.inputs.{role} = {stream!r} is not a stream name")
    table.one_of("backend", engine.backend, BACKENDS,
                 f"{where}: backend {engine.backend!r} is not one of {BACKENDS}")
    table.one_of("precision", engine.precision, PRECISIONS,
                 f"{where}: precision {engine.precision!r} is not one of {PRECISIONS}")
    roles = parse_spec(spec, where).roles() if spec is not None else set()
    if roles - engine.inputs.keys():
        raise ConfigError(f"{where}: the spec reads roles {sorted(roles - engine.inputs.keys())}"
                          f", not in its inputs table {sorted(engine.inputs)}")
    table.in_range("rate_hz", engine.rate_hz, f"{where}: rate_hz {engine.rate_hz} must be "
                   "positive", exclusive_minimum=0)
    if not 0 <= engine.align_delay_ns < engine.latency_ns:
        raise ConfigError(f"{where}: align_delay_ms must be at least 0 and below latency_ms")
    return engine


RECORD_COMPRESSIONS = ("lz4", "zstd", "none")


def _record(data: Any) -> RecordConfig | None:
    if data is None:
        return None
    table = Table(data, "record")
    topics = table.get("topics", list, [])
    if not all(isinstance(t, str) for t in topics):
        raise ConfigError(f"record.topics = {topics!r} must be a list of topic names")
    duration_s = table.get("duration_s", float, None)
    table.in_range("duration_s", duration_s, f"record.duration_s = {duration_s} must be "
                   "positive and fit int64 ns", exclusive_minimum=0,
                   exclusive_maximum=2**63 / 1e9)
    record = RecordConfig(
        path=table.get("path", str), topics=tuple(topics),
        duration_ns=None if duration_s is None else round(duration_s * 1e9),
        compression=table.get("compression", str, "lz4"),
        preview_hz=table.get("preview_hz", float, 10.0),
        chunk_size=table.get("chunk_size_kb", int, 1024) * 1024,
        flush_interval_ns=table.ms("flush_interval_ms", 1000.0),
        overwrite=table.get("overwrite", bool, False))
    table.done()
    message = ("record: preview_hz must not be negative, chunk_size_kb and flush_interval_ms "
               "must be positive")
    table.in_range("preview_hz", record.preview_hz, message, minimum=0)
    table.in_range("chunk_size_kb", record.chunk_size // 1024, message, exclusive_minimum=0)
    table.in_range("flush_interval_ms", record.flush_interval_ns / 1e6, message,
                   exclusive_minimum=0)
    table.one_of("compression", record.compression, RECORD_COMPRESSIONS,
                 f"record.compression = {record.compression!r} is not one of "
                 f"{RECORD_COMPRESSIONS}")
    return record


def _view(data: Any) -> ViewConfig:
    if data is None:
        return ViewConfig()
    table = Table(data, "view")
    address = table.get("foxglove", str, None)
    table.done()
    if address is None:
        return ViewConfig()
    host, _, port_text = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # "[::1]:8765"
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"view.foxglove = {address!r} is not HOST:PORT (a port from 1 to "
                          "65535), e.g. \"127.0.0.1:8765\"")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name or interface: not provably this host only
        loopback = False
    # The server has no authentication and streams the camera and microphone.
    if not loopback:
        raise ConfigError(f"view.foxglove = {address!r} is not a loopback address: anyone who "
                          "reaches it would see the camera and hear the microphone, and the "
                          "Foxglove server has no authentication. Serve on 127.0.0.1 and "
                          "connect through a tunnel (ssh -L 8765:127.0.0.1:8765 robot)")
    return ViewConfig(foxglove=(host, int(port_text)))


# An absolute ROS 2 topic name: /-separated tokens of letters, digits and underscores.
_ROS2_TOPIC = re.compile(r"(/[A-Za-z_][A-Za-z0-9_]*)+")


def _replay(data: Any) -> ReplayConfig:
    if data is None:
        return ReplayConfig()
    table = Table(data, "replay")
    ros2 = table.get("ros2", dict, {})
    table.done()
    for topic, stream in ros2.items():
        if not _ROS2_TOPIC.fullmatch(topic):
            raise ConfigError(f"replay.ros2: key {topic!r} is not an absolute ROS 2 topic name "
                              "(e.g. \"/cam/image_raw\")")
        if not isinstance(stream, str):
            raise ConfigError(f"replay.ros2.\"{topic}\" = {stream!r} is not a stream name")
    return ReplayConfig(ros2=dict(ros2))


def _ros2(data: Any) -> Ros2Config:
    if data is None:
        return Ros2Config()
    table = Table(data, "ros2")
    ros2 = Ros2Config(publish=table.get("publish", bool, False),
                      domain_id=table.get("domain_id", int, 0),
                      sensors=table.get("sensors", bool, False),
                      queue_size=table.get("queue_size", int, 64))
    table.done()
    # ROS 2 (rmw) allows domain ids 0 to 232: what fits the RTPS port formula.
    table.in_range("domain_id", ros2.domain_id, f"ros2.domain_id = {ros2.domain_id} must be "
                   "from 0 to 232 (ROS_DOMAIN_ID)", minimum=0, exclusive_maximum=233)
    table.in_range("queue_size", ros2.queue_size, f"ros2.queue_size = {ros2.queue_size} must "
                   "be positive", exclusive_minimum=0)
    if ros2.sensors and not ros2.publish:
        raise ConfigError("ros2.sensors = true publishes sensor streams alongside the "
                          "predictions: it needs ros2.publish = true")
    return ros2


def parse_config(text: str, source: str, base_dir: str | Path | None = None) -> NodeConfig:
    """Parse a launch file; every error names the file, the key and what is allowed.
    Key paths are resolved against `base_dir` (the launch file's directory)."""
    try:
        return _check_security(_parse_config(text, source), Path(base_dir or "."))
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith(source) else f"{source}: {message}") \
            from None


def _parse_config(text: str, source: str) -> NodeConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML ({exc})") from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise ConfigError(f"{source}: not valid TOML (nested too deeply)") from None
    config = parse_tables(data, source)
    _check_references(config, source)
    return config


def parse_tables(data: Any, source: str) -> NodeConfig:
    """The launch file's tables, each checked on its own; what they refer to across tables
    is checked by `_check_references`. `fusion_node.launch_schema` runs this on probes."""
    root = Table(data, source)
    node = Table(root.get("node", dict, {}), "node")
    drivers = tuple(_driver(d, i) for i, d in enumerate(root.get("drivers", list, [])))
    engines = tuple(_engine(e, i) for i, e in enumerate(root.get("engines", list, [])))
    external = tuple(_stream(s, i) for i, s in enumerate(root.get("streams", list, [])))
    connect = node.get("connect", list, [])
    if not all(isinstance(e, str) for e in connect):
        raise ConfigError(f"node.connect = {connect!r} must be a list of endpoint strings")
    config = NodeConfig(
        pub=node.get("pub", str, DEFAULT_PUB), run_dir=node.get("run_dir", str, None),
        health_period_ns=node.ms("health_period_ms", 1000.0),
        startup_timeout_ns=node.ms("startup_timeout_ms", 10_000.0),
        restart=RestartPolicy(
            max_restarts=node.get("driver_max_restarts", int, 5),
            backoff_initial_s=node.get("driver_restart_backoff_ms", float, 500.0) / 1000,
            backoff_max_s=node.get("driver_restart_backoff_max_ms", float, 10_000.0) / 1000),
        drivers=drivers, engines=engines, connect=tuple(connect), streams=external,
        record=_record(root.get("record", dict, None)),
        calibration=node.get("calibration", str, None),
        server_secret_key=node.get("server_secret_key", str, None),
        allowed_clients=node.get("allowed_clients", str, None),
        max_future_ns=node.ms("max_future_ms", DEFAULT_MAX_FUTURE_NS / 1e6),
        view=_view(root.get("view", dict, None)),
        replay=_replay(root.get("replay", dict, None)),
        ros2=_ros2(root.get("ros2", dict, None)))
    node.in_range("max_future_ms", config.max_future_ns / 1e6, f"{source}: node.max_future_ms "
                  f"= {config.max_future_ns / 1e6} must be >= 0", minimum=0)
    node.done()
    root.done()
    return config


def _check_references(config: NodeConfig, source: str) -> None:
    drivers, engines, external = config.drivers, config.engines, config.streams
    streams = ([d.stream for d in drivers] + [e.topic for e in engines]
               + [s.name for s in external])
    duplicated = {s for s in streams if streams.count(s) > 1}
    if duplicated:
        raise ConfigError(f"{source}: stream(s) {sorted(duplicated)} defined more than once")
    known = set(config.capacities())
    for engine in engines:
        for role, stream in engine.inputs.items():
            if stream not in known:
                raise ConfigError(f"engine {engine.name!r}: input {role} = {stream!r} is not a "
                                  f"configured stream ({sorted(known)})")
    # A bag's topic replays into a sensor stream (predictions are the engines' to make).
    inputs = [d.stream for d in drivers] + [s.name for s in external if s.kind != "prediction"]
    for topic, stream in config.replay.ros2.items():
        if stream not in inputs:
            raise ConfigError(f"replay.ros2.\"{topic}\" = {stream!r} is not a sensor stream of "
                              f"this launch file ({sorted(inputs)})")
    mapped = list(config.replay.ros2.values())
    twice = sorted({s for s in mapped if mapped.count(s) > 1})
    if twice:
        raise ConfigError(f"replay.ros2: stream(s) {twice} mapped from more than one topic")
    # Driver settings are checked here, so a typo fails before any process starts.
    for driver in drivers:
        check_driver_config(driver.kind, driver.stream, driver.config)


def load_config(path: str | Path | None = None) -> NodeConfig:
    """Read a launch file; without a path, the embedded default (simulated sensors)."""
    if path is None:
        text = resources.files("fusion_node").joinpath("default.toml").read_text()
        return parse_config(text, "embedded default")
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read launch file {str(path)!r}: {exc.strerror}") from None
    return parse_config(text, str(path), Path(path).parent)


def _check_security(config: NodeConfig, base_dir: Path) -> NodeConfig:
    """The endpoint policy of fusion_node.security, checked before anything starts: keys
    load, and every endpoint beyond loopback/ipc is covered by them."""
    from fusion_node.security import (
        check_endpoint,
        is_loopback_or_ipc,
        load_allowed_clients,
        load_key_pair,
    )

    if (config.server_secret_key is None) != (config.allowed_clients is None):
        raise ConfigError("node.server_secret_key and node.allowed_clients go together: the "
                          "server key proves the node, the directory lists who may connect")
    keyed = config.server_secret_key is not None
    if keyed:
        assert config.server_secret_key is not None and config.allowed_clients is not None
        secret = str((base_dir / config.server_secret_key).resolve())
        allowed = str((base_dir / config.allowed_clients).resolve())
        load_key_pair(secret, "node.server_secret_key")
        load_allowed_clients(allowed)
        config = replace(config, server_secret_key=secret, allowed_clients=allowed)
    check_endpoint(config.pub, keyed, "node.pub")
    for index, endpoint in enumerate(config.connect):
        check_endpoint(endpoint, keyed, f"node.connect[{index}]")
    for stream in config.streams:
        if stream.clock is not None:
            check_endpoint(stream.clock, keyed, f"stream {stream.name!r} clock")
    for driver in config.drivers:
        # Drivers run on this host and their processes hold no keys: loopback or ipc only.
        for where, endpoint in ((f"driver {driver.stream!r} endpoint", driver.endpoint),
                                (f"driver {driver.stream!r} config.endpoint",
                                 driver.config.get("endpoint"))):
            if isinstance(endpoint, str) and not is_loopback_or_ipc(endpoint):
                raise ConfigError(f"{where} = {endpoint!r} is not loopback or ipc://: "
                                  "drivers hold no keys; receive a remote source as a "
                                  "[[streams]] entry with node.connect and CurveZMQ keys "
                                  "(docs/security.md)")
    return config
