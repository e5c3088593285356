"""Replay a log: publish it on its topics in time, or run the node's engines over it.

Deterministic replay (`replay_through_node`) is a single-threaded discrete-event loop on a
`ReplayClock`. Its events, taken in time order, are:
  - the log's input messages, at their log time: pushed into the alignment buffer;
  - each engine's ticks: with "log" timing, exactly the windows the recording node cut, at
    the times it cut them (`node.window_cuts`); with "schedule" timing, t_ref + align_delay
    on the engine's absolute grid;
  - each prediction being fed back into the buffer (the action engine reads the speech
    engine's output there), as the live node's publisher does: when the recorded one was
    ("log") or at its deadline ("schedule").
At equal times deliveries come first, then messages, then ticks: whatever had arrived by a
tick's time is in its window. Nothing depends on wall time or on thread scheduling, so two
replays of one log give byte-identical predictions on the same backend.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from fusion_node.alignment import AlignmentBuffer
from fusion_node.clock import Clock, ReplayClock
from fusion_node.config import DriverConfig, EngineConfig, NodeConfig, StreamConfig, load_config
from fusion_node.errors import ReplayError
from fusion_node.logs.mcap_format import (
    RECORDING_METADATA,
    WINDOW_CUT,
    WINDOW_CUTS_TOPIC,
    LogReader,
    LogWriter,
    topic_matches,
)
from fusion_node.protocol import Message, Prediction
from fusion_node.scheduling import EngineRunner, PredictionSink, TickGrid

# -- timed replay ---------------------------------------------------------------------------


@dataclass
class PublishStats:
    messages: int = 0
    passes: int = 0
    log_duration_ns: int = 0


def publish_log(path: str, send: Callable[[list[memoryview]], None], clock: Clock, *,
                rate: float = 1.0, fast: bool = False, loop: bool = False,
                topics: Sequence[str] = (), stop: threading.Event | None = None
                ) -> PublishStats:
    """Send the log's messages, byte for byte as recorded, in log-time order: spaced by their
    original receive times divided by `rate`, or back to back with `fast`. `loop` starts
    again at the end until `stop` is set."""
    if not fast and not rate > 0:
        raise ReplayError(f"replay rate {rate} must be positive")
    stats = PublishStats()
    with LogReader(path) as reader:
        selected = [t for t in reader.topics() if topic_matches(t, topics)]
        if not selected:
            raise ReplayError(f"{path}: no topic matches {list(topics)}; the log has "
                              f"{reader.topics()}")
        while stop is None or not stop.is_set():
            first_ns = last_ns = None
            pass_start_ns = clock.now_ns()
            for message in reader.messages(selected):
                if stop is not None and stop.is_set():
                    break
                if first_ns is None:
                    first_ns = message.log_time_ns
                last_ns = message.log_time_ns
                if not fast:
                    clock.sleep_until(pass_start_ns
                                      + round((message.log_time_ns - first_ns) / rate))
                send(message.parts(path))
                stats.messages += 1
            stats.passes += 1
            if first_ns is not None and last_ns is not None:
                stats.log_duration_ns += last_ns - first_ns
            if not loop:
                break
    return stats


# -- configuration --------------------------------------------------------------------------

def _build(cls: Any, item: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in item.items() if k in names})


def config_from_log(path: str, metadata: dict[str, dict[str, str]]) -> NodeConfig | None:
    """The launch config the recording node ran, or None if the log does not hold one.

    Only what a replay uses is restored: streams with their ring sizes, and engines."""
    text = metadata.get(RECORDING_METADATA, {}).get("config")
    if text is None:
        return None
    try:
        data = json.loads(text)
        return NodeConfig(
            pub=data["pub"], run_dir=None, health_period_ns=data["health_period_ns"],
            startup_timeout_ns=data["startup_timeout_ns"],
            drivers=tuple(_build(DriverConfig, d) for d in data["drivers"]),
            engines=tuple(_build(EngineConfig, e) for e in data["engines"]),
            streams=tuple(_build(StreamConfig, s) for s in data.get("streams", [])),
            # A log from before the bound replays with the default.
            **({"max_future_ns": data["max_future_ns"]} if "max_future_ns" in data else {}))
    except (ValueError, KeyError, TypeError) as exc:
        raise ReplayError(f"{path}: the launch config stored in the log does not fit this "
                          f"version of fusion-node ({exc}); pass --config") from None


def replay_config(path: str, config_path: str | None) -> tuple[NodeConfig, str]:
    """The config to replay with, and where it came from: --config, else the one stored in
    the log, else the embedded default."""
    if config_path is not None:
        return load_config(config_path), config_path
    with LogReader(path) as reader:
        config = config_from_log(path, reader.metadata())
    if config is not None:
        return config, "the log's launch config"
    return load_config(None), "the embedded default"


# -- deterministic replay -------------------------------------------------------------------

TIMINGS = ("log", "schedule")


class _ReplaySink:
    """The replay's PredictionSink: predictions wait here until they are delivered."""

    def __init__(self, delivery_ns: Callable[[Prediction, int], int]) -> None:
        self._delivery_ns = delivery_ns
        self._heap: list[tuple[int, int, Prediction]] = []
        self._order = itertools.count()

    def schedule(self, msg: Message, deadline_ns: int) -> None:
        assert isinstance(msg, Prediction)
        heapq.heappush(self._heap, (self._delivery_ns(msg, deadline_ns), next(self._order), msg))

    def next_ns(self) -> int | None:
        return self._heap[0][0] if self._heap else None

    def pop(self) -> tuple[int, Prediction]:
        delivery_ns, _, msg = heapq.heappop(self._heap)
        return delivery_ns, msg


@dataclass
class ReplayResult:
    """What a deterministic replay produced, and what the verification found."""

    config_source: str
    timing: str
    log_duration_ns: int = 0
    messages: int = 0
    predictions: dict[str, int] = field(default_factory=dict)
    missing_required: dict[str, int] = field(default_factory=dict)
    compared: int = 0
    difference: str | None = None


BuildRunners = Callable[[NodeConfig, Clock, AlignmentBuffer, PredictionSink],
                        list[EngineRunner]]
# Per topic and t_ref: the recorded prediction and when it entered the live node's buffer.
Recorded = dict[str, dict[int, tuple[Prediction, int]]]
Ticks = Iterator[tuple[int, int]]  # (tick time, t_ref), in time order


def _schedule(runner: EngineRunner, first_t_ref_ns: int) -> Ticks:
    grid = TickGrid(runner.rate_hz)
    for k in itertools.count(grid.first_at_or_after(first_t_ref_ns)):
        yield grid.t_ref_ns(k) + runner.align_delay_ns, grid.t_ref_ns(k)


def _from_traces(runner: EngineRunner, log: dict[int, tuple[Prediction, int]]) -> Ticks:
    # Logs without window cuts (recorded from sockets): each prediction's trace says when
    # its window was started, which is close to, not exactly, when it was cut.
    for t_ref in sorted(log):
        window_ns = log[t_ref][0].trace.get("t_window_start_ns")
        scheduled_ns = t_ref + runner.align_delay_ns
        yield (window_ns if isinstance(window_ns, int) and window_ns >= scheduled_ns
               else scheduled_ns), t_ref


@dataclass
class _Replay:
    """The event loop: ticks from one iterator per engine, deliveries from the sink."""

    runners: list[EngineRunner]
    iterators: list[Ticks]
    logged: set[int]  # runners whose ticks come from the log: a finite list
    clock: ReplayClock
    buffer: AlignmentBuffer
    sink: _ReplaySink
    writer: LogWriter | None
    ticks: list[tuple[int, int, int]] = field(init=False)  # (tick time, runner index, t_ref)
    ticked: dict[str, set[int]] = field(init=False)
    made: dict[str, dict[int, Prediction]] = field(init=False)

    def __post_init__(self) -> None:
        self.ticks = []
        for index in range(len(self.runners)):
            self._next_tick(index)
        self.ticked = {r.topic: set() for r in self.runners}
        self.made = {r.topic: {} for r in self.runners}

    def _next_tick(self, index: int) -> None:
        tick = next(self.iterators[index], None)
        if tick is not None:
            heapq.heappush(self.ticks, (tick[0], index, tick[1]))

    def advance(self, t_ns: int, ticks_at_t: bool) -> None:
        """Run every delivery due by `t_ns` and every tick before it (at it, if
        `ticks_at_t`), in time order; at equal times a delivery precedes a tick."""
        while True:
            delivery_ns = self.sink.next_ns()
            tick_ns = self.ticks[0][0] if self.ticks else None
            if tick_ns is not None and not (tick_ns < t_ns or (ticks_at_t and tick_ns == t_ns)):
                tick_ns = None  # not due yet
            if delivery_ns is not None and delivery_ns <= t_ns and (
                    tick_ns is None or delivery_ns <= tick_ns):
                self.deliver()
            elif tick_ns is not None:
                self.tick()
            else:
                return

    def tick(self) -> None:
        tick_ns, index, t_ref_ns = heapq.heappop(self.ticks)
        self.clock.advance_to(tick_ns)
        runner = self.runners[index]
        runner.tick(t_ref_ns)
        self.ticked[runner.topic].add(t_ref_ns)
        self._next_tick(index)

    def deliver(self) -> None:
        delivery_ns, msg = self.sink.pop()
        self.clock.advance_to(delivery_ns)
        # Published, then fed back into the buffer, as the live node's publisher does.
        msg.t_publish_ns = msg.t_receive_ns = delivery_ns
        self.buffer.push(msg)
        self.made[msg.stream][msg.t_ref_ns] = msg
        if self.writer is not None:
            self.writer.write(msg, delivery_ns)

    def finish(self) -> None:
        """After the last input: the ticks the log still lists (the live windows cut after
        it), then every prediction still waiting; scheduled ticks stop."""
        self.ticks = [tick for tick in self.ticks if tick[1] in self.logged]
        heapq.heapify(self.ticks)
        self.iterators = [it if i in self.logged else iter(()) for i, it in
                          enumerate(self.iterators)]
        self.advance(2**63, ticks_at_t=True)


def replay_through_node(path: str, config: NodeConfig, *, out_path: str | None = None,
                        verify: bool = False, tolerance: float = 0.0, timing: str = "log",
                        config_source: str = "",
                        build_runners: BuildRunners | None = None,
                        log_name: str | None = None) -> ReplayResult:
    """Run the configured engines over the log on a replay clock; write their predictions to
    `out_path` and, with `verify`, compare them with the predictions the log holds: bit for
    bit, or with floats allowed to differ by up to `tolerance` (absolute).

    `timing` says when each tick runs and each prediction is fed back:
      - "log": as the recording node did. A log the node recorded lists when each window
        was cut (`node.window_cuts`, stamped in order with every message entering the
        buffer): exactly those windows are cut, at those times, so each holds exactly what
        the live one held, even where a sample arrived late or a tick started late. Each
        prediction is fed back when the recorded one entered the buffer. For a log recorded
        from sockets, the ticks are those of the recorded predictions, at the times their
        traces give. Engines with neither run on the schedule.
      - "schedule": as an ideal node would: every tick at t_ref + align_delay from the first
        one, every prediction fed back at its deadline.
    `log_name` is what the output's metadata names as the replayed log (default `path`: a
    rosbag2 replays through a converted copy, and the output names the bag).
    """
    if timing not in TIMINGS:
        raise ReplayError(f"replay timing {timing!r} is not one of {TIMINGS}")
    if not tolerance >= 0:
        raise ReplayError(f"verify tolerance {tolerance} is not a number >= 0")
    if build_runners is None:
        from fusion_node.node import build_engine_runners

        build_runners = build_engine_runners
    result = ReplayResult(config_source, timing)
    with LogReader(path) as reader, threadpool_limits(limits=1, user_api="blas"):
        delivery: dict[tuple[str, int], int] = {}

        def delivery_ns(msg: Prediction, deadline_ns: int) -> int:
            return delivery.get((msg.stream, msg.t_ref_ns), deadline_ns)

        clock = ReplayClock()
        buffer = AlignmentBuffer(config.capacities(), config.max_future_ns)
        sink = _ReplaySink(delivery_ns)
        runners = build_runners(config, clock, buffer, sink)
        engine_topics = {r.topic for r in runners}
        inputs = [t for t in reader.topics() if t in buffer.streams and t not in engine_topics]
        if not inputs:
            raise ReplayError(f"{path}: no topic in the log is an input of the configured "
                              f"engines (log: {reader.topics()}; inputs: "
                              f"{[t for t in buffer.streams if t not in engine_topics]})")
        recorded_topics = [t for t in reader.topics(["prediction"]) if t in engine_topics]
        recorded: Recorded = {t: {} for t in recorded_topics}
        cuts: dict[str, list[tuple[int, int]]] = {t: [] for t in engine_topics}
        if verify or timing == "log":
            _read_recorded(reader, recorded, cuts if timing == "log" else None)
        if timing == "log":
            delivery.update({(topic, t_ref): log_ns for topic, log in recorded.items()
                             for t_ref, (_, log_ns) in log.items()})
        # An engine without predictions in the log starts once every input has spoken, as
        # the live node starts its engines.
        inputs_ns = max(_first(reader, t).log_time_ns for t in inputs)
        ticks: list[Ticks] = []
        logged = set()
        for index, runner in enumerate(runners):
            log = recorded.get(runner.topic)
            if timing == "log" and (cuts[runner.topic] or log):
                logged.add(index)
                ticks.append(iter(sorted(cuts[runner.topic])) if cuts[runner.topic]
                             else _from_traces(runner, log or {}))
                continue
            first = min(log) if log else (
                _first(reader, runner.topic).publish_time_ns
                if runner.topic in recorded_topics else inputs_ns)
            ticks.append(_schedule(runner, first))
        writer = None
        if out_path is not None:
            writer = LogWriter(out_path, preview_hz=0, metadata={
                "source": "replay", "replayed_log": log_name or path,
                "config_source": config_source,
                "timing": timing,
                "model_hashes": json.dumps({r.topic: r.engine.model_hash for r in runners})})
        replay = _Replay(runners, ticks, logged, clock, buffer, sink, writer)
        first_ns = last_ns = None
        read: Counter[str] = Counter()
        try:
            for message in reader.messages(inputs):
                read[message.topic] += 1
                replay.advance(message.log_time_ns, ticks_at_t=False)
                clock.advance_to(message.log_time_ns)
                buffer.push(message.decode(path))
                result.messages += 1
                if first_ns is None:
                    first_ns = message.log_time_ns
                last_ns = message.log_time_ns
            if last_ns is not None:
                replay.advance(last_ns, ticks_at_t=True)
            replay.finish()
        finally:
            if writer is not None:
                writer.close()
    # Every input the log holds reached the buffer once, as it reached the live node's.
    undelivered = {t: (n, buffer.stats[t].received) for t, n in read.items()
                   if buffer.stats[t].received != n}
    if undelivered:
        raise ReplayError(f"{path}: replay delivered a different number of inputs than the "
                          f"log holds (topic: (logged, delivered)): {undelivered}")
    result.log_duration_ns = 0 if first_ns is None or last_ns is None else last_ns - first_ns
    result.predictions = {t: len(made) for t, made in replay.made.items()}
    result.missing_required = {r.topic: r.stats.missing_required for r in runners}
    if verify:
        if not any(recorded.values()):
            raise ReplayError(f"{path}: the log holds no predictions of the configured engines "
                              f"({sorted(engine_topics)}) to verify against")
        result.compared, result.difference = compare_logs(
            {t: {t_ref: p for t_ref, (p, _) in log.items()} for t, log in recorded.items()},
            replay.made, replay.ticked, runners, tolerance)
    return result


def _first(reader: LogReader, topic: str) -> Any:
    # Reads only the first chunk holding the topic.
    return next(iter(reader.messages([topic])))


def _read_recorded(reader: LogReader, recorded: Recorded,
                   cuts: dict[str, list[tuple[int, int]]] | None) -> None:
    """Fill `recorded` with the log's predictions and `cuts` with its window cuts of the
    engines' topics, in one pass."""
    topics = list(recorded)
    if cuts is not None and WINDOW_CUTS_TOPIC in reader.topics([WINDOW_CUT]):
        topics.append(WINDOW_CUTS_TOPIC)
    for message in reader.messages(topics):
        if message.kind == WINDOW_CUT:
            assert cuts is not None
            try:
                cut = json.loads(message.data)
                topic, t_ref_ns = cut["topic"], cut["t_ref_ns"]
            except (ValueError, KeyError, TypeError):
                raise ReplayError(f"{reader.path}: malformed window cut at log time "
                                  f"{message.log_time_ns}") from None
            if topic in cuts:
                cuts[topic].append((message.log_time_ns, t_ref_ns))
            continue
        prediction = message.decode(reader.path)
        assert isinstance(prediction, Prediction)
        recorded[message.topic][prediction.t_ref_ns] = (prediction, message.log_time_ns)


# -- verification ---------------------------------------------------------------------------

def compare_logs(recorded: dict[str, dict[int, Prediction]],
                 replayed: dict[str, dict[int, Prediction]], ticked: dict[str, set[int]],
                 runners: Iterable[EngineRunner],
                 tolerance: float = 0.0) -> tuple[int, str | None]:
    """Compare recorded and replayed predictions of each tick the replay ran within the
    recorded span of each topic; the number compared and the earliest difference."""
    compared = 0
    differences: list[tuple[int, str, str]] = []
    for runner in runners:
        topic = runner.topic
        log = recorded.get(topic, {})
        if not log:
            continue
        hashes = sorted({p.model_hash for p in log.values()})
        if hashes != [runner.engine.model_hash]:
            return compared, (f"{topic}: model hash differs: the log's predictions were made by "
                              f"{', '.join(hashes)}, engine {runner.name!r} now runs "
                              f"{runner.engine.model_hash} (a different model file)")
        now = replayed.get(topic, {})
        low, high = min(log), max(log)
        # A recorded prediction whose tick the replay never reached (the log's inputs ended
        # first) cannot be compared.
        for t_ref in sorted(t for t in ticked.get(topic, ()) if low <= t <= high):
            where = f"{topic} at t_ref {t_ref}"
            if t_ref not in now and t_ref in log:
                reason = runner.stats.last_missing or "none"
                differences.append((t_ref, topic, (f"{where}: the log has a prediction, the "
                                                   f"replay made none (last missing input: "
                                                   f"{reason})")))
                break
            if t_ref not in log:
                if t_ref in now:
                    differences.append((t_ref, topic, (
                        f"{where}: the replay made a prediction the log does not have (the live "
                        "node lacked a required input, or the recorder dropped it)")))
                    break
                continue
            compared += 1
            difference = compare_predictions(log[t_ref], now[t_ref], tolerance)
            if difference is not None:
                differences.append((t_ref, topic, f"{where}: {difference}"))
                break
    if not differences:
        return compared, None
    return compared, min(differences)[2]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _compare_value(name: str, old: Any, new: Any, tolerance: float = 0.0) -> str | None:
    if type(old) is type(new) and old == new:
        return None
    if isinstance(old, float) and isinstance(new, float) and abs(new - old) <= tolerance:
        return None
    if _number(old) and _number(new):
        return f"{name} differs: log {old!r}, now {new!r} (by {abs(new - old):.3g})"
    return f"{name} differs: log {old!r}, now {new!r}"


def compare_predictions(old: Prediction, new: Prediction, tolerance: float = 0.0) -> str | None:
    """The first difference in what two predictions say (engine, model, deadline, mask,
    fields, arrays), or None. Trace times, seq and publish time are not compared: they
    describe the run, not the result. Float fields and float arrays may differ by up to
    `tolerance`; everything else (commands, masks, ints) must be equal."""
    for name in ("engine", "model_hash", "deadline_ns"):
        difference = _compare_value(name, getattr(old, name), getattr(new, name))
        if difference is not None:
            return difference
    for stream in sorted(old.mask.keys() | new.mask.keys()):
        difference = _compare_value(f"mask[{stream!r}]", old.mask.get(stream),
                                    new.mask.get(stream))
        if difference is not None:
            return difference
    for key in sorted(old.fields.keys() | new.fields.keys()):
        difference = _compare_value(f"field {key!r}", old.fields.get(key),
                                    new.fields.get(key), tolerance)
        if difference is not None:
            return difference
    for name in sorted(old.arrays.keys() | new.arrays.keys()):
        if name not in old.arrays or name not in new.arrays:
            return f"array {name!r} is only in the {'replay' if name in new.arrays else 'log'}"
        a, b = old.arrays[name], new.arrays[name]
        if a.dtype != b.dtype or a.shape != b.shape:
            return (f"array {name!r} is {a.dtype} {list(a.shape)} in the log, {b.dtype} "
                    f"{list(b.shape)} now")
        if np.array_equal(a, b, equal_nan=a.dtype.kind == "f"):
            continue
        if a.dtype.kind == "f":
            # Equal values (equal infinities too, whose difference is NaN) and NaN against
            # NaN are the same; anything else must be within the tolerance.
            with np.errstate(invalid="ignore"):
                unequal = ~((a == b) | (np.abs(a - b) <= tolerance)
                            | (np.isnan(a) & np.isnan(b)))
        else:
            unequal = a != b
        if not unequal.any():
            continue
        where = tuple(int(i) for i in np.argwhere(unequal)[0])
        with np.errstate(invalid="ignore"):  # inf against -inf, or a NaN: the delta is NaN
            delta = np.abs(a.astype(np.float64) - b.astype(np.float64))[unequal]
        return (f"array {name!r} differs at {list(where)}: log {a[where]!r}, now {b[where]!r} "
                f"({int(unequal.sum())} of {a.size} elements differ, max by {delta.max():.3g})")
    return None
