"""`fusion-node bench soak`: the embedded default for M minutes with faults on a schedule.

The node runs in this process from the embedded default (simulated camera and arm in their
own processes, both engines) and records everything to a temporary MCAP log. Two subscriber
processes read every prediction (one through the node's `Subscriber`, one through the
control-loop `Client`); a third socket subscribes and never reads. The microphone is the
real PortAudio driver on a paced device that overruns (fusion_node.bench.faults), and the wall
clock of every process jumps by an hour back and forth all along.

Each cycle injects, in turn: the camera driver killed (restarted with back-off); the joint
source stalled 1 s (its process stopped, then continued); a microphone overrun (200 ms
lost); a publisher flooding 10x the arm's rate for 4 s; the speech engine raising for half a
second; the action engine hanging past its timeout; an outside publisher truncating,
rewriting and unlinking shared-memory rings under the node (`shm_attack`); an outside
publisher stamping 520 joint states of the arm's stream a day ahead, then one with seq
2^63 - 1 (`future`). A prediction whose t_ref lies in a fault or the second after it counts
as "during faults".

Figures: messages in and out, drops by reason, deadline misses (during and outside faults),
publish-time jitter, the node's garbage-collector pauses, RSS at start and end (and its growth per hour, fitted over the run
after warm-up), and the recording's integrity (it opens, and holds what was published).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fusion_node.bench.faults import (
    ATTACK_PROBE,
    FaultyEngine,
    WallClockJumps,
    fault_process_argv,
    inject_faulty_engine,
    install_wall_clock_jumps,
    wall_clock_jump_env,
)
from fusion_node.clock import MonotonicClock
from fusion_node.config import RecordConfig, StreamConfig, load_config
from fusion_node.errors import EngineError
from fusion_node.host.gc_pauses import GcPauses
from fusion_node.node import Node
from fusion_node.progress import progress_seconds_async

_NS_PER_S = 1_000_000_000
_WARM_UP_S = 8.0
_CYCLE_S = 60.0
# Offsets of each fault within a cycle (s); every one is over well before the next.
(_CAMERA_AT_S, _STALL_AT_S, _OVERRUN_AT_S, _FLOOD_AT_S, _RAISE_AT_S, _HANG_AT_S,
 _SHM_ATTACK_AT_S, _FUTURE_AT_S) = (3.0, 10.0, 17.0, 24.0, 32.0, 40.0, 46.0, 53.0)
_STALL_S = 1.0
_OVERRUN_LOST_MS = 200.0
_FLOOD_S = 4.0
_FLOOD_RATE_HZ = 2000.0  # 10x the simulated arm's 200 Hz
_RAISE_TICKS = 15  # half a second of the speech engine's 30 Hz
_HANG_EXTRA_S = 0.5  # the action engine hangs this long past its inference timeout
FAULTS = ("camera", "stall", "overrun", "flood", "raise", "hang", "shm_attack", "future")
_RECOVERY_S = 1.0  # a fault's window extends this long after it ends
_WALL_JUMP_PERIOD_NS = 7 * _NS_PER_S
_SUBSCRIBER_GRACE_S = 2.0
_FAULT_TIMEOUT_S = 15.0  # a fault whose effect is not seen by then is logged and left

log = logging.getLogger(__name__)


@dataclasses.dataclass
class FaultLog:
    """When each injected fault was active, on the node clock."""

    windows: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)

    def add(self, kind: str, start_ns: int, end_ns: int) -> None:
        self.windows.append((kind, start_ns, end_ns + round(_RECOVERY_S * _NS_PER_S)))

    def during(self, t_ns: int) -> bool:
        return any(start <= t_ns <= end for _, start, end in self.windows)

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for kind, _, _ in self.windows:
            counts[kind] = counts.get(kind, 0) + 1
        return {"injected": counts,
                "seconds_in_fault_windows": round(sum(e - s for _, s, e in self.windows) / 1e9,
                                                  1)}


def _summary_ms(values_ns: list[int] | np.ndarray) -> dict[str, float]:
    values = np.asarray(values_ns, np.float64) / 1e6
    if not len(values):
        return {"count": 0}
    p50, p99 = np.percentile(values, [50, 99])
    return {"count": len(values), "p50_ms": round(float(p50), 4),
            "p99_ms": round(float(p99), 4), "max_ms": round(float(values.max()), 4)}


_RSS_KINDS = ("RssAnon", "RssFile", "RssShmem")


def _rss_bytes() -> tuple[int, ...]:
    """This process's resident memory: total, then anonymous, file-backed, shared memory."""
    kb: dict[str, int] = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in _RSS_KINDS:
                kb[key] = int(value.split()[0])
    parts = [kb.get(k, 0) * 1024 for k in _RSS_KINDS]
    return (sum(parts), *parts)


# -- subscribers (run as their own processes) ------------------------------------------------

def subscribe(endpoint: str, duration_s: float, via: str) -> dict[str, Any]:
    """Read predictions for `duration_s` through the node's `Subscriber` (`via` "transport")
    or the control-loop `Client` ("client"); per topic: received, seq gaps, late flags and
    arrival after the deadline."""
    from fusion_node.protocol import Prediction

    clock = MonotonicClock()
    received: dict[str, list[tuple[int, int]]] = {}
    end_ns = clock.now_ns() + round(duration_s * _NS_PER_S)
    if via == "client":
        from fusion_node.client import Client

        client = Client(endpoint)
        recv = client.recv
        close = client.close
        rejected = client.rejected
    else:
        import zmq

        from fusion_node.transport import Subscriber

        context = zmq.Context()
        subscriber = Subscriber(context, [endpoint], clock, topics=["pred."])
        recv = subscriber.recv

        def close() -> None:
            subscriber.close()
            context.term()

        rejected = subscriber.rejected
    late: dict[str, int] = {}
    while clock.now_ns() < end_ns:
        msg = recv(100)
        if isinstance(msg, Prediction):
            received.setdefault(msg.stream, []).append((msg.seq, msg.t_receive_ns
                                                        - msg.deadline_ns))
            late[msg.stream] = late.get(msg.stream, 0) + int(msg.late)
    close()
    result: dict[str, Any] = {"via": via, "rejected": dict(rejected)}
    for topic, rows in received.items():
        seqs = np.array([seq for seq, _ in rows])
        result[topic] = {"received": len(rows),
                         "seq_gaps": int((np.diff(seqs) - 1).clip(min=0).sum()),
                         "late_flags": late[topic],
                         "arrival_after_deadline": _summary_ms([d for _, d in rows])}
    return result


# -- the run ----------------------------------------------------------------------------------

class _Soak:
    def __init__(self, minutes: float, tmp: Path, faults: tuple[str, ...]) -> None:
        self.duration_s = minutes * 60.0
        self.fault_kinds = faults
        self.tmp = tmp
        self.clock = MonotonicClock()
        self.faults = FaultLog()
        self.rss: list[tuple[int, ...]] = []  # (t_ns, total, anon, file, shmem)
        self.processes: list[subprocess.Popen[str]] = []
        self.flood_sent = 0
        mic_endpoint = f"ipc://{tmp}/mic.ipc"
        self.flood_endpoint = f"ipc://{tmp}/flood.ipc"
        self.attack_endpoint = f"ipc://{tmp}/attack.ipc"
        self.attacks: dict[str, dict[str, int]] = {}
        config = load_config()
        self.config = dataclasses.replace(
            config, pub="tcp://127.0.0.1:*",
            # The microphone (and the flood) come from fault processes, as external streams.
            drivers=tuple(d for d in config.drivers if d.stream != "audio.mic0"),
            streams=(StreamConfig("audio.mic0", "audio", 256),
                     StreamConfig("joints.aux", "joints", 512)),
            connect=(mic_endpoint, self.flood_endpoint, self.attack_endpoint),
            record=RecordConfig(path=str(tmp / "soak.mcap")))
        overruns = ",".join(f"{_WARM_UP_S + k * _CYCLE_S + _OVERRUN_AT_S}:{_OVERRUN_LOST_MS}"
                            for k in range(self._cycles())) if "overrun" in faults else ""
        self.microphone = self._start("microphone", "--stream", "audio.mic0", "--endpoint",
                                      mic_endpoint, "--overruns", overruns)

    def _cycles(self) -> int:
        return max(1, int((self.duration_s - _WARM_UP_S) // _CYCLE_S) + 1)

    def _start(self, kind: str, *args: str, stdin: int | None = None) -> subprocess.Popen[str]:
        process = subprocess.Popen(fault_process_argv(kind, *args), text=True, stdin=stdin,
                                   stdout=subprocess.PIPE)
        self.processes.append(process)
        return process

    async def run(self) -> tuple[Node, list[dict[str, Any]], int]:
        node = Node(self.config, self.clock)
        stop = asyncio.Event()
        task = asyncio.create_task(node.run(stop))
        await node.ready.wait()
        import zmq

        context = zmq.Context()
        stalled = context.socket(zmq.SUB)  # a subscriber that never reads
        stalled.setsockopt(zmq.RCVHWM, 1)
        stalled.setsockopt(zmq.SUBSCRIBE, b"")
        stalled.connect(node.pub_endpoint)
        subscribers = [await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fusion_node.bench.soak", node.pub_endpoint,
            str(self.duration_s), via, stdout=subprocess.PIPE) for via in ("transport", "client")]
        start_ns = self.clock.now_ns()
        speech = inject_faulty_engine(node, "speech")
        action = inject_faulty_engine(node, "action")
        sampler = asyncio.create_task(self._sample_rss())
        try:
            async with progress_seconds_async(self.duration_s, desc="bench soak"):
                await self._inject(node, start_ns, speech, action)
        finally:
            sampler.cancel()
            stop.set()
            await task
            stalled.close(linger=0)
            context.term()
        results = [json.loads((await s.communicate())[0]) for s in subscribers]
        return node, results, start_ns

    async def _sample_rss(self) -> None:
        while True:
            self.rss.append((self.clock.now_ns(), *_rss_bytes()))
            await asyncio.sleep(1.0)

    async def _at(self, t_ns: int) -> None:
        await asyncio.sleep(max(0, t_ns - self.clock.now_ns()) / 1e9)

    async def _until(self, condition: Any, what: str, poll_s: float = 0.05) -> None:
        deadline_ns = self.clock.now_ns() + round(_FAULT_TIMEOUT_S * _NS_PER_S)
        while not condition():
            if self.clock.now_ns() > deadline_ns:
                log.warning("soak: %s not seen within %.0f s", what, _FAULT_TIMEOUT_S)
                return
            await asyncio.sleep(poll_s)

    async def _inject(self, node: Node, start_ns: int, speech: FaultyEngine,
                      action: FaultyEngine) -> None:
        end_ns = start_ns + round(self.duration_s * _NS_PER_S)
        hang_runner = next(r for r in node.runners if r.name == "action")
        for k in range(self._cycles()):
            cycle_ns = start_ns + round((_WARM_UP_S + k * _CYCLE_S) * _NS_PER_S)
            steps = [(_CAMERA_AT_S, self._camera), (_STALL_AT_S, self._stall),
                     (_FLOOD_AT_S, self._flood), (_RAISE_AT_S, self._raise),
                     (_HANG_AT_S, self._hang), (_SHM_ATTACK_AT_S, self._shm_attack),
                     (_FUTURE_AT_S, self._future)]
            for at_s, step in steps:
                if step.__name__.lstrip("_") not in self.fault_kinds:
                    continue
                t_ns = cycle_ns + round(at_s * _NS_PER_S)
                if t_ns + 6 * _NS_PER_S > end_ns:  # no time left to see it through
                    break
                await self._at(t_ns)
                log.info("soak: cycle %d: %s", k, step.__name__.lstrip("_"))
                await step(node, speech, action, hang_runner)
        await self._at(end_ns)

    async def _camera(self, node: Node, *_: Any) -> None:
        camera = node.driver_processes["camera.front"]
        frames = node.buffer.stats["camera.front"]
        start_ns = self.clock.now_ns()
        received = frames.received
        camera.kill()
        # Back-off and a new Python process: seconds.
        await self._until(lambda: frames.received > received + 5 and camera.state == "running",
                          "the camera back")
        self.faults.add("camera_unplugged", start_ns, self.clock.now_ns())

    async def _stall(self, node: Node, *_: Any) -> None:
        pid = node.driver_processes["joints.arm"].pid
        if pid is None:
            return
        start_ns = self.clock.now_ns()
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(_STALL_S)
        finally:
            os.kill(pid, signal.SIGCONT)
        self.faults.add("joints_stalled", start_ns, self.clock.now_ns())

    async def _flood(self, *_: Any) -> None:
        start_ns = self.clock.now_ns()
        flood = self._start("joints", "--stream", "joints.aux", "--endpoint",
                            self.flood_endpoint, "--rate-hz", str(_FLOOD_RATE_HZ),
                            "--seconds", str(_FLOOD_S))
        stdout, _ = await asyncio.to_thread(flood.communicate, timeout=_FLOOD_S + 30)
        self.processes.remove(flood)  # done: one per cycle would pile up over a long soak
        self.flood_sent += json.loads(stdout)["sent"]
        self.faults.add("flood_10x", start_ns, self.clock.now_ns())

    async def _raise(self, node: Node, speech: FaultyEngine, *_: Any) -> None:
        start_ns = self.clock.now_ns()
        target = speech.raised + _RAISE_TICKS
        speech.raise_next(_RAISE_TICKS, EngineError("engine 'speech': injected failure"))
        await self._until(lambda: speech.raised >= target, "the speech engine raising")
        self.faults.add("engine_raised", start_ns, self.clock.now_ns())

    async def _hang(self, node: Node, speech: FaultyEngine, action: FaultyEngine,
                    runner: Any) -> None:
        start_ns = self.clock.now_ns()
        hangs = action.hangs
        action.hang_next(runner.infer_timeout_ns / 1e9 + _HANG_EXTRA_S)
        await self._until(lambda: action.hangs > hangs, "the action engine hanging", 0.01)
        await self._until(lambda: not runner.hang_status(self.clock.now_ns())["inferring_ms"],
                          "the action engine back")
        self.faults.add("engine_hung", start_ns, self.clock.now_ns())

    async def _attack(self, node: Node, kind: str, fault: str, stream: str,
                      *args: str) -> None:
        """Run an outside attacker once the node hears its probes; add up its summary."""
        start_ns = self.clock.now_ns()
        heard = node.buffer.unknown_streams[ATTACK_PROBE]
        process = self._start(kind, "--stream", stream, "--endpoint", self.attack_endpoint,
                              *args, stdin=subprocess.PIPE)
        await self._until(lambda: node.buffer.unknown_streams[ATTACK_PROBE] > heard,
                          f"the {kind} attacker's probes")
        stdout, _ = await asyncio.to_thread(process.communicate, "go\n", _FAULT_TIMEOUT_S)
        self.processes.remove(process)
        for key, value in json.loads(stdout).items():
            if isinstance(value, int) and not key.endswith("_ns"):
                self.attacks.setdefault(fault, {}).setdefault(key, 0)
                self.attacks[fault][key] += value
        self.faults.add(fault, start_ns, self.clock.now_ns())

    async def _shm_attack(self, node: Node, *_: Any) -> None:
        await self._attack(node, "shm-attack", "shm_attack", "camera.front")

    async def _future(self, node: Node, *_: Any) -> None:
        await self._attack(node, "future-stamps", "future_stamps", "joints.arm")

    def stop_processes(self) -> dict[str, Any]:
        self.microphone.terminate()
        stdout, _ = self.microphone.communicate(timeout=10)
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        microphone = json.loads(stdout) if stdout.strip() else {}
        for start, end in microphone.get("overrun_spans_ns", []):
            self.faults.add("microphone_overrun", start, end)
        return microphone


def _read_log(path: str, faults: FaultLog, start_ns: int, pauses: GcPauses
              ) -> dict[str, Any]:
    """Open the recording as a replay would and read every message back; list the late
    predictions outside faults with the collector pauses between t_ref and publication."""
    from fusion_node.errors import ReplayError
    from fusion_node.logs.mcap_format import LogReader

    counts: dict[str, int] = {}
    jitter: dict[str, list[int]] = {"all": [], "outside_faults": []}
    late = {"during_faults": 0, "outside_faults": 0}
    late_outside: list[dict[str, Any]] = []
    # Outside faults, per prediction topic: how long the window and feeds took, and inference.
    stages: dict[str, dict[str, list[int]]] = {}
    try:
        with LogReader(path) as log:
            for message in log.messages():
                counts[message.topic] = counts.get(message.topic, 0) + 1
                if not message.topic.startswith("pred."):
                    continue
                prediction: Any = message.decode(path)
                during = faults.during(prediction.t_ref_ns)
                offset = prediction.t_publish_ns - prediction.deadline_ns
                jitter["all"].append(offset)
                if not during:
                    jitter["outside_faults"].append(offset)
                    trace = prediction.trace
                    topic_stages = stages.setdefault(message.topic, {"window_and_feeds": [],
                                                                     "infer": []})
                    topic_stages["window_and_feeds"].append(
                        trace["t_infer_start_ns"] - trace["t_window_start_ns"])
                    topic_stages["infer"].append(trace["t_infer_end_ns"]
                                                 - trace["t_infer_start_ns"])
                if prediction.late:
                    late["during_faults" if during else "outside_faults"] += 1
                    if not during and len(late_outside) < 100:
                        late_outside.append({
                            "topic": message.topic,
                            "t_s": round((prediction.t_ref_ns - start_ns) / 1e9, 3),
                            "late_ms": round(offset / 1e6, 2),
                            # When each stage ended (ms after t_ref): which one was slow.
                            "trace_ms": {k: round((v - prediction.t_ref_ns) / 1e6, 2)
                                         for k, v in prediction.trace.items()},
                            "gc_pause_ms": round(pauses.overlapping_ms(
                                prediction.t_ref_ns, prediction.t_publish_ns), 2)})
    except ReplayError as exc:
        return {"readable": False, "error": str(exc), "messages_by_topic": counts}
    return {"readable": True, "messages_by_topic": counts, "late": late,
            "late_outside_faults": late_outside,
            "stages_outside_faults": {topic: {k: _summary_ms(v) for k, v in by_stage.items()}
                                      for topic, by_stage in stages.items()},
            "jitter": {k: _summary_ms(v) for k, v in jitter.items()}}


def run_soak_bench(minutes: float = 30.0, faults: tuple[str, ...] = FAULTS) -> dict[str, Any]:
    """Run the soak for `minutes`, injecting `faults`, and return its figures (see the module
    docstring)."""
    if not minutes > 0:
        raise ValueError(f"--minutes must be positive, got {minutes}")
    unknown = sorted(set(faults) - set(FAULTS) - {""})
    if unknown:
        raise ValueError(f"--faults: unknown {', '.join(unknown)}; expected some of "
                         f"{', '.join(FAULTS)}")
    faults = tuple(f for f in faults if f)
    with tempfile.TemporaryDirectory(prefix="fusion-node-soak-") as tmp_name:
        tmp = Path(tmp_name)
        jumps = WallClockJumps(_WALL_JUMP_PERIOD_NS, (0.0, 3600.0, -3600.0))
        saved_env = {k: os.environ.get(k) for k in ("PYTHONPATH",)}
        os.environ.update(wall_clock_jump_env(jumps, tmp / "site"))
        undo_jumps = install_wall_clock_jumps(jumps)
        started = time.monotonic()
        soak = _Soak(minutes, tmp, faults)
        try:
            node, subscribers, start_ns = asyncio.run(soak.run())
        finally:
            microphone = soak.stop_processes()
            undo_jumps()
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        wall_s = time.monotonic() - started
        assert node.recorder is not None
        recorder = node.recorder.stats()
        log = _read_log(str(tmp / "soak.mcap"), soak.faults, start_ns, node.gc_pauses)
        log_bytes = (tmp / "soak.mcap").stat().st_size
    return _figures(soak, node, subscribers, start_ns, microphone, recorder, log, log_bytes,
                    wall_s)


def _figures(soak: _Soak, node: Node, subscribers: list[dict[str, Any]], start_ns: int,
             microphone: dict[str, Any], recorder: dict[str, Any], log: dict[str, Any],
             log_bytes: int, wall_s: float) -> dict[str, Any]:
    health = node.health()
    streams = health["streams"]
    sensors = [s for s in streams if not s.startswith("pred.")]
    engines = {name: {k: e[k] for k in ("published", "deadline_misses", "missing_required",
                                         "errors", "timeouts", "skipped_ticks")}
               for name, e in health["engines"].items()}
    assert node.publisher is not None
    predictions = sum(e["published"] for e in engines.values())
    # What the recorder was offered: every message entering the buffer, and every health.
    expected = {s: streams[s]["received"] - recorder["dropped"].get(s, 0) for s in streams}
    expected["node.health"] = (node.publisher.sent - predictions
                               - recorder["dropped"].get("node.health", 0))
    logged = log["messages_by_topic"]
    # Rings, shared-memory slots and latency windows fill during the first minutes: the
    # baseline and the fit start after a tenth of the run (at least the warm-up).
    warm_ns = start_ns + round(max(_WARM_UP_S, soak.duration_s / 10) * _NS_PER_S)
    rss = [sample for sample in soak.rss if sample[0] >= warm_ns] or soak.rss
    times_h = np.array([sample[0] for sample in rss], np.float64) / 3.6e12
    sizes_mb = np.array([sample[1] for sample in rss], np.float64) / 2**20
    slope = float(np.polyfit(times_h, sizes_mb, 1)[0]) if len(rss) > 2 else 0.0
    late_total = sum(e["deadline_misses"] for e in engines.values())
    return {
        "minutes": round(soak.duration_s / 60, 2), "wall_s": round(wall_s, 1),
        "faults": soak.faults.summary(),
        "messages": {
            "in": {s: streams[s]["received"] for s in sensors},
            "in_total": sum(streams[s]["received"] for s in sensors),
            "rejected": health["rejected"],
            "out_total": node.publisher.sent, "out_predictions": predictions,
            "out_health": node.publisher.sent - predictions,
            "flood_sent": soak.flood_sent,
            "attacks": soak.attacks,
        },
        "drops": {
            "streams": {s: {k: streams[s].get(k, 0) for k in (
                "evicted", "too_old", "too_new", "duplicates", "seq_gaps", "seq_restarts",
                "sample_gaps", "gap_samples")}
                for s in sensors},
            "microphone_driver": microphone,
            "engines": {n: {k: e[k] for k in ("missing_required", "errors", "timeouts",
                                                "skipped_ticks")}
                        for n, e in engines.items()},
            "recorder": recorder["dropped"],
            "driver_restarts": {s: d.get("restarts", 0) for s, d in health["drivers"].items()},
        },
        "deadline_misses": {"total": late_total, **log.get("late", {}),
                            "late_outside_faults": log.get("late_outside_faults", [])},
        "publish_jitter": log.get("jitter", {}),
        "engine_stages": log.get("stages_outside_faults", {}),
        "subscribers": subscribers,
        "rss_mb": {"start": round(float(sizes_mb[0]), 1), "end": round(float(sizes_mb[-1]), 1),
                   "growth": round(float(sizes_mb[-1] - sizes_mb[0]), 1),
                   "growth_per_hour_fit": round(slope, 1),
                   "by_kind_start_end": {
                       kind.removeprefix("Rss").lower(): [round(rss[0][2 + i] / 2**20, 1),
                                                           round(rss[-1][2 + i] / 2**20, 1)]
                       for i, kind in enumerate(_RSS_KINDS)},
                   "max_rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                    1)},
        "recording": {
            "bytes": log_bytes, "readable": log["readable"], "error": log.get("error", ""),
            "counts_match": all(logged.get(t, 0) == n for t, n in expected.items()),
            "messages": {t: {"logged": logged.get(t, 0), "expected": n}
                         for t, n in sorted(expected.items())},
        },
        "engines": engines,
        "gc_pauses": health["gc_pauses"],
        "heap_trim": health["heap_trim"],
    }


if __name__ == "__main__":
    # A subscriber of the soak. Ctrl-C reaches the whole group: stop quietly, as the bench
    # does, instead of each subscriber printing a KeyboardInterrupt.
    try:
        print(json.dumps(subscribe(sys.argv[1], float(sys.argv[2]) + _SUBSCRIBER_GRACE_S,
                                   sys.argv[3])))
    except KeyboardInterrupt:
        sys.exit(130)
