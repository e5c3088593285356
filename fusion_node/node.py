"""The node: wires drivers → alignment buffer → engines → deadline publisher from a config.

Threads, each with one job: a receiver (blocking ZeroMQ receive, faster than zmq.asyncio on
the hot path) pushing into the buffer; one runner per engine; the deadline publisher, sole
owner of the output socket. The event loop starts and supervises them, runs in-process
drivers, and publishes `node.health`.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import json
import logging
import resource
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import zmq
from threadpoolctl import threadpool_limits

from fusion_node.alignment import AlignmentBuffer
from fusion_node.bindings import ActionBinding, SpecBinding, SpeechBinding
from fusion_node.calibration import Calibration, load_calibration
from fusion_node.clock import Clock, MonotonicClock, measure_wall_clock
from fusion_node.config import NODE_PUB, EngineConfig, NodeConfig
from fusion_node.errors import CalibrationError, ConfigError, EndOfStream, FusionError
from fusion_node.host.gc_pauses import GcPauses
from fusion_node.host.heap import TRIM_PERIOD_S, HeapTrimmer
from fusion_node.host.supervisor import SupervisedProcess
from fusion_node.host.systemd import SystemdNotifier
from fusion_node.host.threads import raise_thread_niceness, realtime_context
from fusion_node.protocol import AudioChunk, Health, Message, Prediction
from fusion_node.remote_clock import ClockTracker
from fusion_node.scheduling import (
    Binding,
    DeadlinePublisher,
    EngineRunner,
    PredictionSink,
)
from fusion_node.security import CurveServer, load_key_pair, private_directory
from fusion_node.shm import reclaim_stale_segments
from fusion_node.transport import Publisher, Subscriber

if TYPE_CHECKING:
    from fusion_node.logs.recorder import Recorder
    from fusion_node.ros2.dds import DdsBridge

log = logging.getLogger(__name__)

HEALTH_TOPIC = "node.health"
# A Python thread waiting for the GIL gets it after at most this long; the default 5 ms
# would let a busy preprocessing thread delay a publish by up to 5 ms.
_SWITCH_INTERVAL_S = 0.001
_DRIVER_STOP_TIMEOUT_S = 3.0
_THREAD_JOIN_TIMEOUT_S = 2.0


PACKAGE_SCHEME = "package:"


def model_path(model: str) -> Path:
    """A reference model by name ("speech", "action"), a file that an installed Python
    package ships (`package:silero_vad/data/silero_vad.onnx`), or a path to an ONNX file."""
    if model.startswith(PACKAGE_SCHEME):
        package, _, inner = model[len(PACKAGE_SCHEME):].partition("/")
        # find_spec locates the package without running its __init__ (which may import torch).
        found = importlib.util.find_spec(package) if package.isidentifier() else None
        if found is None or not found.submodule_search_locations or not inner:
            raise ConfigError(f"model {model!r}: no installed package {package!r} (or no file "
                              "named after it)")
        return Path(next(iter(found.submodule_search_locations))) / inner
    if model.endswith(".onnx") or "/" in model:
        return Path(model)
    return Path(str(resources.files("engines") / "models" / f"{model}.onnx"))


def make_binding(engine: EngineConfig, config: NodeConfig) -> Binding:
    inputs = engine.inputs
    try:
        if engine.binding == "speech":
            roi = engine.params.get("mouth_roi", ())
            if roi == "landmarks":  # found per frame by the face landmark model
                return SpeechBinding(inputs["audio"], inputs["video"], roi)
            roi = tuple(roi) if isinstance(roi, (list, tuple)) else ()
            if len(roi) != 4 or not all(isinstance(v, int) for v in roi):
                raise ConfigError(f"engine {engine.name!r}: params.mouth_roi must be "
                                  f"[x, y, w, h] ints or \"landmarks\", "
                                  f"got {engine.params.get('mouth_roi')!r}")
            return SpeechBinding(inputs["audio"], inputs["video"], roi)  # type: ignore[arg-type]
        producer = next((e for e in config.engines if e.topic == inputs["command"]), None)
        if producer is None:
            raise ConfigError(f"engine {engine.name!r}: command input {inputs['command']!r} is "
                              "not the topic of a configured engine")
        # Choose the speech prediction by declared latency, not by when it happened to
        # arrive, so the choice is the same in a replay.
        delay_ns = max(0, producer.latency_ns - engine.align_delay_ns)
        return ActionBinding(inputs["image"], inputs["joints"], inputs["command"], delay_ns)
    except KeyError as exc:
        raise ConfigError(f"engine {engine.name!r}: binding {engine.binding!r} needs input "
                          f"{exc.args[0]!r}") from None


def _backend_notes(config: NodeConfig, runners: list[EngineRunner]) -> dict[str, dict[str, Any]]:
    """Per engine: the backend it runs on and, where "auto" did not get TensorRT, why."""
    from engines.backends import tensorrt_unused

    asked = {e.name: e for e in config.engines}
    notes: dict[str, dict[str, Any]] = {}
    for runner in runners:
        backend = getattr(runner.engine, "backend", "")
        notes[runner.name] = {"backend": backend}
        reason = tensorrt_unused(asked[runner.name].backend, backend,
                                 asked[runner.name].precision)
        if reason is not None:
            notes[runner.name]["tensorrt_unused"] = reason
    return notes


def build_engine_runners(config: NodeConfig, clock: Clock, buffer: AlignmentBuffer,
                         sink: PredictionSink) -> list[EngineRunner]:
    """Load, warm up and bind every configured engine, each on its configured backend
    ("auto": TensorRT where usable, else ONNX Runtime). The live node and offline replay
    both build their engines here, so a replay runs exactly what the robot ran."""
    from engines.backends import create_engine
    from engines.spec import parse_spec

    runners = []
    for engine_config in config.engines:
        where = f"engine {engine_config.name!r}"
        spec = parse_spec(engine_config.spec, where) if engine_config.spec is not None else None
        engine = create_engine(
            model_path(engine_config.model), backend=engine_config.backend,
            name=engine_config.name, precision=engine_config.precision,
            intra_op_threads=engine_config.intra_op_threads,
            input_shapes=spec.input_shapes() if spec else None,
            example_feeds=spec.example_feeds() if spec else None,
            calibration=engine_config.calibration)
        binding: Binding
        if spec is not None:
            spec.check(where, engine.inputs, engine.outputs)
            binding = SpecBinding(spec, engine_config.inputs, engine.inputs,
                                  round(1e9 / engine_config.rate_hz), where)
        else:
            binding = make_binding(engine_config, config)
        engine.warm_up()
        runners.append(EngineRunner(
            name=engine_config.name, topic=engine_config.topic, engine=engine,
            binding=binding, rate_hz=engine_config.rate_hz,
            latency_ns=engine_config.latency_ns, align_delay_ns=engine_config.align_delay_ns,
            clock=clock, buffer=buffer, sink=sink))
    return runners


class Observer(Protocol):
    """Something off the real-time path that sees what the node sees: every message entering
    the alignment buffer (sensor samples, the node's own predictions) and each node.health.
    The live Foxglove server is one (fusion_node.view.foxglove_live, made by the CLI: the
    runtime imports no view code)."""

    name: str  # its entry in node.health

    def offer(self, msg: Message) -> bool:
        """Take `msg` without blocking (a bounded queue, drops counted); False if not taken."""
        ...

    def stats(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class AudioContinuity:
    """Samples missing between consecutive chunks of each audio stream's run (a device
    overrun, a lost chunk), counted for node.health; the alignment buffer masks them."""

    def __init__(self) -> None:
        self._next_index: dict[str, int] = {}
        self.gaps: Counter[str] = Counter()
        self.gap_samples: Counter[str] = Counter()

    def note(self, msg: Message) -> None:
        if not isinstance(msg, AudioChunk):
            return
        expected = self._next_index.get(msg.stream)
        if expected is not None and msg.sample_index > expected:
            self.gaps[msg.stream] += 1
            self.gap_samples[msg.stream] += msg.sample_index - expected
        # An index going back is a restarted driver (a new run): follow it.
        self._next_index[msg.stream] = msg.sample_index + len(msg.samples)

    def summary(self, stream: str) -> dict[str, int] | None:
        if stream not in self._next_index:
            return None
        return {"sample_gaps": self.gaps[stream], "gap_samples": self.gap_samples[stream]}


class Node:
    def __init__(self, config: NodeConfig, clock: Clock | None = None,
                 context: zmq.Context | None = None, observers: Sequence[Observer] = ()) -> None:
        self.config = config
        self.observers = list(observers)  # owned: closed when the run ends
        self.clock = clock or MonotonicClock()
        self._context = context or realtime_context()
        self._owns_context = context is None
        self.buffer = AlignmentBuffer(config.capacities(), config.max_future_ns)
        if config.record is not None:
            from fusion_node.logs.recorder import RecordingBuffer

            # Records what enters the buffer and when windows are cut (see logs/recorder.py).
            self.buffer = RecordingBuffer(config.capacities(), self.clock,
                                          config.max_future_ns)
        self.runners: list[EngineRunner] = []
        self.publisher: DeadlinePublisher | None = None
        self.subscriber: Subscriber | None = None
        self.reclaimed_segments: list[str] = []  # stale ring links removed at start and exit
        self.pub_endpoint = config.pub
        self.driver_processes: dict[str, SupervisedProcess] = {}
        self.driver_errors: dict[str, str] = {}
        self._receiving = threading.Event()
        self._threads: list[threading.Thread] = []
        self.thread_priorities: dict[str, str] = {}  # non-real-time threads: what they got
        self._engine_threads: list[threading.Thread] = []
        self._backends: dict[str, dict[str, Any]] = {}
        self._started_ns = 0
        self._last_health: tuple[int, dict[str, int]] = (0, {})
        self._health_seq = 0
        self.ready = asyncio.Event()
        self._systemd = SystemdNotifier()
        self.recorder: Recorder | None = None
        self.calibration: Calibration | None = None
        self._corrections_ns: dict[str, int] = {}
        if config.calibration is not None:
            self.calibration = load_calibration(config.calibration)
            _check_calibration_streams(self.calibration, config)
            self._corrections_ns = self.calibration.corrections_ns()
        self.clock_trackers: dict[str, ClockTracker] = {}
        self.unmapped: Counter[str] = Counter()  # remote samples dropped: no mapping yet
        self.gc_pauses = GcPauses()
        self.heap = HeapTrimmer()
        self.audio_continuity = AudioContinuity()
        self.curve: CurveServer | None = None  # with keys: authenticator, refusal counts
        self.ros2: DdsBridge | None = None  # [ros2] publish: outputs as ROS 2 topics

    # -- start-up ---------------------------------------------------------------------------

    def _driver_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """A driver's config with NODE_PUB ("node.pub") replaced by this node's publish
        endpoint as bound, so a driver that follows the node (the simulated arm) follows this
        one, whatever --pub says, never another node on the default port."""
        return {key: self.pub_endpoint if value == NODE_PUB else value
                for key, value in config.items()}

    def _driver_processes(self, run_dir: Path) -> list[str]:
        """Supervisors for the out-of-process drivers (started by the caller); their
        endpoints."""
        endpoints = []
        for driver in self.config.drivers:
            if not driver.process:
                continue
            endpoint = driver.endpoint or f"ipc://{run_dir}/{driver.stream}.ipc"
            self.driver_processes[driver.stream] = SupervisedProcess(
                f"driver {driver.stream}",
                [sys.executable, "-m", "drivers", "--kind", driver.kind, "--stream",
                 driver.stream, "--endpoint", endpoint, "--config",
                 json.dumps(self._driver_config(driver.config)),
                 *([] if driver.shared_memory else ["--no-shared-memory"])],
                self.config.restart)
            endpoints.append(endpoint)
        return endpoints

    async def _run_in_process_driver(self, kind: str, stream: str,
                                     driver_config: dict[str, Any]) -> None:
        from drivers.registry import create_driver

        driver = create_driver(kind, stream, driver_config, self.clock)
        await driver.connect()
        try:
            while True:
                sample = await driver.recv()
                sample.t_receive_ns = self.clock.now_ns()
                if self._correct(sample):
                    self.audio_continuity.note(sample)
                    self._push(sample)
        except EndOfStream:
            log.info("driver %s reached the end of its source", stream)
        except FusionError as exc:
            self.driver_errors[stream] = str(exc)
            log.error("driver %s failed: %s", stream, exc)
        finally:
            await driver.disconnect()

    def _receive_blocking(self, subscriber: Subscriber) -> None:
        correcting = bool(self._corrections_ns or self.clock_trackers)
        while self._receiving.is_set():
            msg = subscriber.recv(timeout_ms=50)
            if msg is not None and (not correcting or self._correct(msg)):
                self.audio_continuity.note(msg)
                self._push(msg)

    def _push(self, msg: Message) -> None:
        """Into the alignment buffer, and to the observers (the live Foxglove server) and the
        ROS 2 bridge if there are."""
        self.buffer.push(msg)
        for observer in self.observers:  # bounded, non-blocking queues: no conversion here
            observer.offer(msg)
        if self.ros2 is not None:  # the same: DDS writes happen on the bridge's thread
            self.ros2.offer(msg)

    def _correct(self, msg: Message) -> bool:
        """Map a remote stamp onto the node clock, then subtract the calibrated delay; False
        if the sample cannot be placed in time yet (no clock mapping)."""
        tracker = self.clock_trackers.get(msg.stream)
        if tracker is not None:
            mapping = tracker.mapping  # one immutable object: no lock needed
            if mapping is None:
                self.unmapped[msg.stream] += 1
                return False
            msg.t_capture_ns = mapping.to_local_ns(msg.t_capture_ns)  # type: ignore[misc]
        shift_ns = self._corrections_ns.get(msg.stream)
        if shift_ns:
            msg.t_capture_ns -= shift_ns  # type: ignore[misc]
        return True

    def _start_clock_trackers(self) -> None:
        """One thread per stream declared on a remote clock, until receiving stops."""
        drifts = self.calibration.clock_drifts if self.calibration else {}
        for stream in self.config.streams:
            if stream.clock is None:
                continue
            tracker = ClockTracker(self._context, stream.clock, self.clock,
                                   initial_drift=drifts.get(stream.name, 0.0), curve=self.curve)
            self.clock_trackers[stream.name] = tracker
            self._start_thread(f"clock {stream.name}", tracker.run_blocking, self._receiving)

    def _wait_for_rehearsals(self) -> None:
        """Ready once every engine has paid its first tick's costs (a hung backend: once its
        inference timeout has passed, and its health says so)."""
        for runner in self.runners:
            if not runner.rehearsed.wait(runner.infer_timeout_ns / 1e9):
                log.warning("engine %s: not rehearsed within its %.0f ms inference timeout",
                            runner.name, runner.infer_timeout_ns / 1e6)

    def _start_thread(self, name: str, target: Any, *args: Any,
                      realtime: bool = False) -> threading.Thread:
        """A node thread. `realtime` ones (publisher, engines) ask for real-time priority
        themselves; the others run at a lower nice value where allowed."""

        def run_niced() -> None:
            self.thread_priorities[name] = raise_thread_niceness()
            target(*args)

        thread = threading.Thread(target=target if realtime else run_niced,
                                  args=args if realtime else (), name=name, daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    def _start_recorder(self) -> None:
        """Record to the launch file's [record] log (see fusion_node.logs.recorder), from before
        the first sensor sample, with the config and model hashes a replay needs."""
        record = self.config.record
        if record is None:
            return
        from fusion_node.logs.recorder import Recorder, RecordingBuffer, node_metadata

        assert isinstance(self.buffer, RecordingBuffer)
        self.recorder = Recorder(record.path, self.clock, topics=record.topics,
                                 duration_ns=record.duration_ns, compression=record.compression,
                                 chunk_size=record.chunk_size, preview_hz=record.preview_hz,
                                 flush_interval_ns=record.flush_interval_ns,
                                 metadata=node_metadata(self.config, self.runners),
                                 overwrite=record.overwrite)
        self.recorder.start()
        self.buffer.attach(self.recorder, self.runners)

    @property
    def _ros2_drivers(self) -> dict[str, dict[str, Any]]:
        """Streams read from ROS 2 topics (stamps on ROS time): their driver configs."""
        return {d.stream: d.config for d in self.config.drivers if d.kind == "ros2"}

    def _start_ros2(self) -> None:
        """Publish predictions and health (and sensors, with ros2.sensors) as ROS 2 topics
        (fusion_node.ros2.dds), if the launch file's [ros2] asks for it."""
        ros2 = self.config.ros2
        if not ros2.publish:
            return
        try:
            from fusion_node.ros2.dds import BridgeTopic, DdsBridge
            from fusion_node.ros2.messages import ros_topic
        except ImportError as exc:
            raise ConfigError(f"ros2.publish needs the [ros2] extra (cyclonedds, rosbags): "
                              f"{exc}") from None

        named = [(e.topic, ros_topic(e.topic, "prediction", e.binding), False)
                 for e in self.config.engines]
        named.append((HEALTH_TOPIC, ros_topic(HEALTH_TOPIC, "health"), False))
        if ros2.sensors:
            # A stream read from ROS 2 is there already: publishing it again would echo it.
            sensors = [(d.stream, d.sample_kind) for d in self.config.drivers
                       if d.kind != "ros2"]
            sensors += [(s.name, s.kind) for s in self.config.streams if s.kind != "prediction"]
            named += [(stream, ros_topic(stream, kind), True) for stream, kind in sensors]
        wall = measure_wall_clock()  # ROS 2 stamps are ROS time: the wall clock
        self.ros2 = DdsBridge(ros2.domain_id, [
            BridgeTopic(stream, topic.name, topic.type, sensor) for stream, topic, sensor in named],
            queue_size=ros2.queue_size, stamp_offset_ns=wall.wall_ns - wall.monotonic_ns)
        self.ros2.start()

    def _close_observers(self) -> None:
        for observer in self.observers:
            observer.close()

    def shortfalls(self) -> list[str]:
        """What this run failed to produce: sensor streams that never sent a sample, and
        engines that published nothing (with what they were missing). Empty for a good run."""
        sensors = [d.stream for d in self.config.drivers] + [
            s.name for s in self.config.streams if s.kind != "prediction"]
        out = [f"stream {s} never sent a sample" for s in sensors
               if not self.buffer.stats[s].received]
        for runner in self.runners:
            if not runner.stats.published:
                why = runner.stats.last_missing or runner.stats.last_error or "never ticked"
                out.append(f"engine {runner.name} published nothing ({why})")
        return out

    async def _wait_for_streams(self) -> None:
        deadline = self.clock.now_ns() + self.config.startup_timeout_ns
        streams = [d.stream for d in self.config.drivers]
        while self.clock.now_ns() < deadline:
            if all(self.buffer.stats[s].received for s in streams):
                return
            await asyncio.sleep(0.01)
        silent = [s for s in streams if not self.buffer.stats[s].received]
        log.warning("no samples yet from %s; starting engines anyway", silent)

    # -- main -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Start everything, run until `stop` is set, then shut down cleanly."""
        previous_interval = sys.getswitchinterval()
        sys.setswitchinterval(_SWITCH_INTERVAL_S)
        # OpenBLAS worker threads busy-wait after each call: at 30 Hz of small matrix
        # products they kept a whole core spinning. Engines bring their own threads.
        blas_limit = threadpool_limits(limits=1, user_api="blas")
        self._started_ns = self.clock.now_ns()
        # Links to the rings of processes that died (a killed node's drivers): their memory
        # went with them, their names are cleared here, and again at exit.
        self.reclaimed_segments = reclaim_stale_segments()
        run_dir, run_dir_tmp = self._open_run_dir()
        try:
            output = self._open_output()
            try:
                async with asyncio.TaskGroup() as tasks:
                    supervisors, background = await self._start(tasks, run_dir)
                    self.ready.set()
                    self._systemd.ready()
                    await stop.wait()
                    self._systemd.stopping()
                    for task in background:
                        task.cancel()
                    # Engines first, so no prediction is made from a half-stopped sensor set.
                    await asyncio.to_thread(self._stop_threads)
                    await self._stop_driver_processes()
                    await asyncio.gather(*supervisors)
            finally:
                await self._release(output)
        finally:
            if run_dir_tmp is not None:
                run_dir_tmp.cleanup()
            self.reclaimed_segments += reclaim_stale_segments()
            blas_limit.restore_original_limits()
            sys.setswitchinterval(previous_interval)

    def _open_run_dir(self) -> tuple[Path, tempfile.TemporaryDirectory[str] | None]:
        """The directory of the driver sockets: the configured one, else a temporary one
        (returned too, for removal at exit)."""
        if self.config.run_dir:
            run_dir = Path(self.config.run_dir)
            # Driver sockets live here: only this user may reach them (docs/security.md).
            private_directory(run_dir, "node.run_dir")
            return run_dir, None
        run_dir_tmp = tempfile.TemporaryDirectory(prefix="fusion-node-")
        return Path(run_dir_tmp.name), run_dir_tmp

    def _open_output(self) -> Publisher:
        """The output socket (behind CURVE when configured) and the deadline publisher on it."""
        if self.config.server_secret_key is not None:
            assert self.config.allowed_clients is not None
            self.curve = CurveServer(self._context, load_key_pair(self.config.server_secret_key,
                                                                  "node.server_secret_key"),
                                     self.config.allowed_clients)
            self.curve.start()
        try:
            output = Publisher(self._context, self.config.pub, curve=self.curve)
        except BaseException:
            if self.curve is not None:
                self.curve.close()
            self._close_observers()
            raise
        self.pub_endpoint = output.endpoint
        self.publisher = DeadlinePublisher(output.send_parts, self.clock,
                                           on_published=self._on_published)
        return output

    async def _start(self, tasks: asyncio.TaskGroup,
                     run_dir: Path) -> tuple[list[asyncio.Task[Any]], list[asyncio.Task[Any]]]:
        """Start drivers, receiver, publisher and engines in that order, and wait until every
        stream has delivered and every engine has rehearsed; (driver supervisors, background
        tasks)."""
        assert self.publisher is not None
        self.runners = build_engine_runners(self.config, self.clock, self.buffer,
                                            self.publisher)
        self._backends = _backend_notes(self.config, self.runners)
        self._start_recorder()
        self._start_ros2()
        endpoints = self._driver_processes(run_dir) + list(self.config.connect)
        supervisors = [tasks.create_task(p.run(), name=p.name)
                       for p in self.driver_processes.values()]
        self.subscriber = Subscriber(self._context, endpoints, self.clock, curve=self.curve)
        self._receiving.set()
        self._start_clock_trackers()
        self._start_thread("receiver", self._receive_blocking, self.subscriber)
        background = [
            tasks.create_task(self._run_in_process_driver(d.kind, d.stream,
                                                          self._driver_config(d.config)),
                              name=f"driver {d.stream}")
            for d in self.config.drivers if not d.process]
        self._start_thread("publisher", self.publisher.run_blocking, realtime=True)
        await self._wait_for_streams()
        # The first health report pays one-off costs (numpy's first percentile took 40 ms
        # holding the GIL); pay them before the engines' first deadline.
        self.health()
        # Objects alive after start-up (models, modules) live until exit; freezing them
        # keeps the collector's full passes, which hold the GIL, short.
        gc.collect()
        gc.freeze()
        self.gc_pauses.install()
        for runner in self.runners:
            self._engine_threads.append(
                self._start_thread(f"engine {runner.name}", runner.run_blocking,
                                   realtime=True))
        await asyncio.to_thread(self._wait_for_rehearsals)
        background.append(tasks.create_task(self._publish_health(), name="health"))
        if self.heap.available:
            background.append(tasks.create_task(self._trim_heap(), name="heap"))
        if self._systemd.watchdog_period_s is not None:
            background.append(tasks.create_task(self._keep_watchdog(), name="watchdog"))
        return supervisors, background

    async def _release(self, output: Publisher) -> None:
        """Stop and close everything `run` opened, whatever stage it reached."""
        self._stop_threads()
        self._close_engines()
        self.gc_pauses.remove()
        for tracker in self.clock_trackers.values():
            tracker.close()
        await self._stop_driver_processes()
        if self.recorder is not None:  # after the publisher: the last predictions too
            self.recorder.close()
        self._close_observers()
        if self.ros2 is not None:  # after the publisher: the last predictions too
            self.ros2.stop()
        if self.subscriber is not None:
            self.subscriber.close()
        output.close()
        if self.curve is not None:
            self.curve.close()
        if self._owns_context:
            self._context.term()

    def _stop_threads(self) -> None:
        """Stop ticking, publish what is due, stop receiving; idempotent."""
        for runner in self.runners:
            runner.stop()
        # Runners finish their tick before the publisher stops: a prediction scheduled while
        # it drains would otherwise be counted as published and never sent.
        for thread in self._engine_threads:
            thread.join(_THREAD_JOIN_TIMEOUT_S)
        if self.publisher is not None:
            self.publisher.stop()
        self._receiving.clear()
        for thread in self._threads:
            thread.join(_THREAD_JOIN_TIMEOUT_S)

    def _close_engines(self) -> None:
        """Free each engine's GPU buffers and streams, except one whose thread is still
        inside a (hung) inference: freeing memory under a running GPU call would crash."""
        threads = dict(zip((r.name for r in self.runners), self._engine_threads, strict=False))
        for runner in self.runners:
            thread = threads.get(runner.name)
            if thread is None or not thread.is_alive():
                runner.engine.close()

    async def _stop_driver_processes(self) -> None:
        await asyncio.gather(*(p.stop(_DRIVER_STOP_TIMEOUT_S)
                               for p in self.driver_processes.values()))

    def _on_published(self, prediction: Prediction) -> None:
        # Other engines (the action engine's command input) read predictions from the buffer.
        prediction.t_receive_ns = prediction.t_publish_ns
        self._push(prediction)

    # -- health -----------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """Status ("ok" or "degraded", with the problems), per-stream rates and drops,
        per-engine latencies and deadline misses."""
        now = self.clock.now_ns()
        last_ns, last_counts = self._last_health
        elapsed_s = (now - last_ns) / 1e9 if last_ns else 0.0
        streams = {}
        for stream, stats in self.buffer.stats.items():
            entry = stats.summary()
            previous = last_counts.get(stream, 0)
            entry["rate_hz"] = round((stats.received - previous) / elapsed_s, 2) \
                if elapsed_s else 0.0
            entry["age_ms"] = round((now - stats.last_capture_ns) / 1e6, 3) \
                if stats.last_capture_ns else None
            continuity = self.audio_continuity.summary(stream)
            if continuity is not None:
                entry.update(continuity)
            if stream in self._corrections_ns:
                entry["correction_ms"] = self._corrections_ns[stream] / 1e6
            tracker = self.clock_trackers.get(stream)
            if tracker is not None:
                mapping = tracker.mapping
                entry["clock"] = {**(mapping.summary(now) if mapping else {"mapped": False}),
                                  "unmapped": self.unmapped[stream],
                                  "timeouts": tracker.timeouts,
                                  "jumps": tracker.estimator.jumps}
            elif stream in self._ros2_drivers:
                from drivers.ros2 import clock_summary

                entry["clock"] = clock_summary(self._ros2_drivers[stream], now)
            else:
                # Stamped by a driver on this host's monotonic clock: no offset to estimate.
                entry["clock"] = {"source": "local", "uncertainty_ms": 0.0}
            streams[stream] = entry
        self._last_health = (now, {s: st.received for s, st in self.buffer.stats.items()})
        drivers: dict[str, dict[str, Any]] = {}
        for stream, process in self.driver_processes.items():
            drivers[stream] = process.summary()
        for stream, error in self.driver_errors.items():
            drivers.setdefault(stream, {})["error"] = error
        subscriber = self.subscriber
        publisher = self.publisher
        # What the run is missing, while it lasts: a supervisor or `top` sees it without
        # reading every counter, and the final exit code agrees with it.
        problems = self.shortfalls() + [f"driver {stream}: {error}" for stream, error
                                        in self.driver_errors.items()]
        return {
            "status": "degraded" if problems else "ok",
            "problems": problems,
            "uptime_s": round((now - self._started_ns) / 1e9, 3),
            "streams": streams,
            "rejected": dict(subscriber.rejected) if subscriber else {},
            # Shared memory: frames lost whole per stream, publishers' inline fallbacks.
            "shm": subscriber.shm_stats() if subscriber else {},
            "last_rejection": subscriber.last_error if subscriber else "",
            "unknown_streams": dict(self.buffer.unknown_streams),
            "engines": {r.name: {**r.stats.summary(), **self._backends.get(r.name, {}),
                                 "priority": r.priority,
                                 **r.hang_status(now),
                                 # What a binding reports of itself (the speech binding: how
                                 # often the face landmarker found the mouth).
                                 **getattr(r.binding, "health", dict)()}
                        for r in self.runners},
            "publish_jitter": publisher.jitter_ns.summary() if publisher else {},
            "publisher_priority": publisher.priority if publisher else "",
            "thread_priorities": dict(self.thread_priorities),
            "drivers": drivers,
            "security": self.curve.summary() if self.curve is not None else {"curve": False},
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "gc_pauses": self.gc_pauses.summary(),
            "heap_trim": self.heap.summary(),
            **({"recorder": self.recorder.stats()} if self.recorder is not None else {}),
            **{observer.name: observer.stats() for observer in self.observers},
            **({"ros2": self.ros2.stats()} if self.ros2 is not None else {}),
        }

    async def _keep_watchdog(self) -> None:
        # Sent from the event loop itself: if the loop hangs, the pings stop.
        assert self._systemd.watchdog_period_s is not None
        while True:
            self._systemd.watchdog()
            await asyncio.sleep(self._systemd.watchdog_period_s)

    async def _trim_heap(self) -> None:
        while True:
            await asyncio.sleep(TRIM_PERIOD_S)
            self.heap.trim()

    async def _publish_health(self) -> None:
        assert self.publisher is not None
        period_s = self.config.health_period_ns / 1e9
        while True:
            await asyncio.sleep(period_s)
            now = self.clock.now_ns()
            health = Health(HEALTH_TOPIC, self._health_seq, now, self.health())
            self.publisher.schedule(health, now)
            if self.recorder is not None:
                self.recorder.offer(health, log_time_ns=now)
            for observer in self.observers:
                observer.offer(health)
            if self.ros2 is not None:
                self.ros2.offer(health)
            self._health_seq += 1


def _check_calibration_streams(calibration: Calibration, config: NodeConfig) -> None:
    """A calibration naming a stream the launch file lacks is a mismatch of robot files."""
    sensors = {d.stream for d in config.drivers} | {
        s.name for s in config.streams if s.kind != "prediction"}
    unknown = calibration.streams() - sensors
    if unknown:
        raise CalibrationError(f"calibration {calibration.path!r} names stream(s) "
                               f"{sorted(unknown)} that are not sensor streams of this launch "
                               f"file ({sorted(sensors)})")
