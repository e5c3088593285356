"""`fusion-node record`, `replay`, `log info`, `log recover` and `bench record`.

Recording has two modes:
  - without `--endpoint`, `record OUT.mcap` runs the node (the embedded default, or
    `--config`) and records inside it, exactly as `run --record OUT.mcap` or a launch file's
    `[record]` table do: every sensor message as the node received it, every prediction and
    `node.health` as it published them, with the node's own receive times;
  - with `--endpoint E ...`, it subscribes to running publishers (a node's `--pub`, drivers'
    endpoints) and records the bytes it receives, with its own receive times.
Heavy modules (mcap, the node, the engines) are imported by the handlers, not here.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from fusion_node.errors import ReplayError


def add_log_parsers(commands: Any) -> None:
    """Register `record`, `replay` and `log` on the `fusion-node` subparsers."""
    record = commands.add_parser(
        "record", help="record sensors and predictions to an MCAP log",
        description="Without --endpoint: run the node (--config, default the embedded "
        "simulated robot) and record inside it. With --endpoint: record what running "
        "publishers send.")
    record.add_argument("record", metavar="OUT.mcap", help="log to write")
    record.add_argument("--endpoint", action="append", default=[],
                        help="subscribe to this endpoint instead of running a node "
                        "(repeatable), e.g. tcp://127.0.0.1:5599")
    record.add_argument("--topics", nargs="+", default=[],
                        help="record only these topics (prefixes end in '.', e.g. pred.)")
    record.add_argument("--duration", type=float, help="stop after this many seconds")
    record.add_argument("--config", help="launch file for the node (without --endpoint)")
    record.add_argument("--pub", help="the node's publish endpoint (without --endpoint)")
    record.add_argument("--compression", choices=("lz4", "zstd", "none"),
                        help="chunk compression, lossless (default lz4: fastest)")
    record.add_argument("--chunk-size", type=int, metavar="BYTES",
                        help="chunk size: a crash loses at most the chunk in memory "
                        "(default 1 MiB)")
    record.add_argument("--flush-interval", type=float, metavar="S",
                        help="also close a chunk after this many seconds (default 1)")
    record.add_argument("--preview-hz", type=float,
                        help="rate of the half-resolution Foxglove camera preview "
                        "(0: no previews; default 10)")

    replay = commands.add_parser(
        "replay", help="publish a log in time, or run the engines over it deterministically")
    replay.add_argument("log", metavar="LOG.mcap")
    pace = replay.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=float, default=1.0,
                      help="publish at this multiple of the recorded speed (default 1)")
    pace.add_argument("--fast", action="store_true", help="publish as fast as possible")
    replay.add_argument("--loop", action="store_true", help="start again at the end")
    replay.add_argument("--topics", nargs="+", default=[],
                        help="publish only these topics (prefixes end in '.')")
    replay.add_argument("--pub", default="tcp://127.0.0.1:5599",
                        help="endpoint to publish on (default tcp://127.0.0.1:5599)")
    replay.add_argument("--start-delay", type=float, default=0.5, metavar="S",
                        help="wait this long after binding, so subscribers connect first")
    replay.add_argument("--through-node", action="store_true",
                        help="run the engines over the log on the replay clock, as fast as "
                        "possible (deterministic), instead of publishing it")
    replay.add_argument("--config", help="launch file for --through-node (default: the one "
                        "stored in the log, else the embedded default)")
    replay.add_argument("--out", metavar="PRED.mcap", help="write the predictions here")
    replay.add_argument("--verify", action="store_true",
                        help="compare the predictions with those in the log; exit 1 on the "
                        "first difference (implies --through-node)")
    replay.add_argument("--timing", choices=("log", "schedule"), default="log",
                        help="--through-node: tick when the recording node cut each window "
                        "(log, default) or at t_ref + align delay (schedule)")

    log = commands.add_parser("log", help="inspect or recover a log")
    actions = log.add_subparsers(dest="log_command", required=True)
    info = actions.add_parser("info", help="topics, counts, rates, duration, gaps, drops")
    info.add_argument("log", metavar="LOG.mcap")
    info.add_argument("--json", action="store_true", help="one JSON object")
    recover = actions.add_parser("recover", help="copy every whole chunk of a broken log "
                                 "into a complete, indexed one")
    recover.add_argument("broken", metavar="BROKEN.mcap")
    recover.add_argument("fixed", metavar="FIXED.mcap")


def _record_config(args: argparse.Namespace, base: Any = None) -> Any:
    """What to record: the options given on the command line over `base` (a launch file's
    `[record]` table), over the defaults."""
    from fusion_node.config import RecordConfig

    options: dict[str, Any] = {name: getattr(args, name, None) for name in
                               ("compression", "chunk_size", "preview_hz")}
    if getattr(args, "topics", None):
        options["topics"] = tuple(args.topics)
    if getattr(args, "flush_interval", None) is not None:
        options["flush_interval_ns"] = round(args.flush_interval * 1e9)
    given = {name: value for name, value in options.items() if value is not None}
    return dataclasses.replace(base or RecordConfig(args.record), path=args.record, **given)


def with_record(config: Any, args: argparse.Namespace) -> Any:
    """`config` recording to `args.record` (`run --record`, or `record` without
    --endpoint)."""
    return dataclasses.replace(config, record=_record_config(args, config.record))


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT and SIGTERM set `stop`; the previous handlers come back afterwards."""
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.getsignal(signum) for signum in signals}
    for signum in signals:
        signal.signal(signum, lambda *_: stop.set())
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _record_endpoints(args: argparse.Namespace) -> int:
    import zmq

    from fusion_node.clock import MonotonicClock
    from fusion_node.recording import Recorder, record_endpoints_blocking

    clock = MonotonicClock()
    record = _record_config(args)
    recorder = Recorder(record.path, clock, topics=record.topics,
                        compression=record.compression, chunk_size=record.chunk_size,
                        preview_hz=record.preview_hz, flush_interval_ns=record.flush_interval_ns,
                        metadata={"source": "subscriber", "endpoints": json.dumps(args.endpoint)})
    context = zmq.Context()
    stop = threading.Event()
    end_ns = None if args.duration is None else clock.now_ns() + round(args.duration * 1e9)
    recorder.start()
    try:
        with _stop_on_signals(stop):
            print(f"fusion-node record: recording {', '.join(args.endpoint)} to {args.record}",
                  file=sys.stderr, flush=True)
            rejected = record_endpoints_blocking(recorder, context, args.endpoint, clock, stop,
                                                 end_ns)
    finally:
        recorder.close()
        context.term()
    stats = recorder.stats()
    print(json.dumps({"path": args.record, "written": stats["written"],
                      "dropped": stats["dropped"], "rejected": dict(rejected),
                      "error": stats["error"]}))
    if stats["error"]:
        raise ReplayError(stats["error"])
    return 0


def _replay_through_node(args: argparse.Namespace) -> int:
    from fusion_node.clock import MonotonicClock
    from fusion_node.replay import replay_config, replay_through_node

    clock = MonotonicClock()
    config, source = replay_config(args.log, args.config)
    started_ns = clock.now_ns()
    result = replay_through_node(args.log, config, out_path=args.out, verify=args.verify,
                                 timing=args.timing, config_source=source)
    wall_s = (clock.now_ns() - started_ns) / 1e9
    log_s = result.log_duration_ns / 1e9
    print(json.dumps({"log": args.log, "config": source, "timing": result.timing,
                      "log_s": round(log_s, 3), "wall_s": round(wall_s, 3),
                      "x_realtime": round(log_s / wall_s, 2) if wall_s else None,
                      "messages": result.messages, "predictions": result.predictions,
                      "missing_required": result.missing_required, "out": args.out,
                      **({"verified": result.compared} if args.verify else {})}))
    if args.verify and result.difference is not None:
        raise ReplayError(f"verify failed after {result.compared} identical predictions: "
                          f"{result.difference}")
    return 0


def _publish(args: argparse.Namespace) -> int:
    import zmq

    from fusion_node.clock import MonotonicClock
    from fusion_node.replay import publish_log
    from fusion_node.transport import Publisher

    clock = MonotonicClock()
    context = zmq.Context()
    stop = threading.Event()
    publisher = Publisher(context, args.pub)
    try:
        with _stop_on_signals(stop):
            stop.wait(args.start_delay)  # ZeroMQ drops what is sent before a subscriber joins
            started_ns = clock.now_ns()
            stats = publish_log(args.log, publisher.send_parts, clock, rate=args.rate,
                                fast=args.fast, loop=args.loop, topics=args.topics, stop=stop)
            wall_s = (clock.now_ns() - started_ns) / 1e9
    finally:
        publisher.close()
        context.term()
    print(json.dumps({"log": args.log, "pub": publisher.endpoint, "messages": stats.messages,
                      "passes": stats.passes, "log_s": round(stats.log_duration_ns / 1e9, 3),
                      "wall_s": round(wall_s, 3)}))
    return 0


def run_log_command(args: argparse.Namespace,
                    run_node: Callable[[argparse.Namespace], Coroutine[Any, Any, None]]
                    ) -> int:
    """Run `record`, `replay` or `log`; `run_node` is the CLI's node runner (for `record`
    without --endpoint). Returns the exit status."""
    if args.command == "record":
        if args.endpoint:
            return _record_endpoints(args)
        if args.duration is None:
            print("fusion-node record: running the node until Ctrl-C", file=sys.stderr)
        import asyncio

        asyncio.run(run_node(args))
        return 0
    if args.command == "replay":
        if args.through_node or args.verify or args.out:
            return _replay_through_node(args)
        return _publish(args)
    if args.log_command == "info":
        from fusion_node.logs import format_info, log_info

        info = log_info(args.log)
        print(json.dumps(info) if args.json else format_info(info))
        return 0
    from fusion_node.logs import recover

    result = recover(args.broken, args.fixed)
    state = "complete" if result.was_complete else f"stopped at byte {result.read_bytes} of " \
        f"{result.input_bytes}: {result.stop_reason}"
    print(f"recovered {result.messages} messages on {len(result.topics)} topics into "
          f"{args.fixed} ({state})")
    return 0


# -- bench record ---------------------------------------------------------------------------

_FRAME_POOL = 30  # distinct frames, cycled: noise is costly to draw at 30 fps
_NOISE_STD = 2.0  # camera-like sensor noise, so frames compress like a real camera's do


def run_record_bench(duration_s: float = 20.0) -> dict[str, Any]:
    """Record 30 fps 640x480 rgb8 + 16 kHz audio (10 ms chunks) + 500 Hz joints in real time
    through the node's recorder (bounded queue, writer thread), then replay the log as fast
    as possible: published without the node, and through the node's engines."""
    import numpy as np
    import zmq

    from drivers.simulated import (
        JOINT_NAMES,
        SimulatedCamera,
        SimulatedCameraConfig,
        joint_motion,
        voice,
    )
    from fusion_node.clock import MonotonicClock, thread_cpu_ns
    from fusion_node.config import load_config
    from fusion_node.protocol import AudioChunk, Frame, JointState
    from fusion_node.recording import Recorder
    from fusion_node.replay import publish_log, replay_through_node
    from fusion_node.transport import Publisher

    clock = MonotonicClock()
    rng = np.random.default_rng(0)
    camera = SimulatedCamera(SimulatedCameraConfig("camera.front"), clock)
    frames = []
    for i in range(_FRAME_POOL):
        image = camera.render(i * 33_333_333).astype(np.float32)
        noisy = image + rng.normal(0, _NOISE_STD, image.shape)
        frames.append(np.clip(noisy, 0, 255).astype(np.uint8))
    rates_hz = {"frame": 30, "audio": 100, "joints": 500}
    with tempfile.TemporaryDirectory(prefix="fusion-node-bench-") as tmp:
        path = f"{tmp}/bench.mcap"
        recorder = Recorder(path, clock, metadata={"source": "bench record"})
        recorder.start()
        start_ns = clock.now_ns()
        end_ns = start_ns + round(duration_s * 1e9)
        index = {kind: 0 for kind in rates_hz}

        def capture_ns(kind: str, k: int) -> int:
            return start_ns + k * 1_000_000_000 // rates_hz[kind]

        def ready_ns(kind: str) -> int:
            # An audio chunk is delivered once its last sample is captured; the rest at once.
            return capture_ns(kind, index[kind] + (kind == "audio"))

        offer_cpu_ns = raw_bytes = 0
        while True:
            active = [k for k in rates_hz if capture_ns(k, index[k]) < end_ns]
            if not active:
                break
            kind = min(active, key=ready_ns)
            seq = index[kind]
            t_ns = capture_ns(kind, seq)
            clock.sleep_until(ready_ns(kind))
            index[kind] += 1
            msg: Frame | AudioChunk | JointState
            if kind == "frame":
                msg = Frame("camera.front", seq, t_ns, frames[seq % _FRAME_POOL], "rgb8")
                raw_bytes += msg.image.nbytes
            elif kind == "audio":
                times = t_ns + np.arange(160, dtype=np.int64) * 62_500
                samples = 16000 * voice(times) + rng.normal(0, 30, 160)
                msg = AudioChunk("audio.mic0", seq, t_ns, 16_000, seq * 160,
                                 samples.astype(np.int16)[:, None])
                raw_bytes += msg.samples.nbytes
            else:
                position, velocity, effort = joint_motion(t_ns)
                msg = JointState("joints.arm", seq, t_ns, JOINT_NAMES, position, velocity,
                                 effort)
                raw_bytes += 3 * position.nbytes
            msg.t_receive_ns = clock.now_ns()
            cpu_ns = thread_cpu_ns()
            recorder.offer(msg)
            offer_cpu_ns += thread_cpu_ns() - cpu_ns
        recorder.close()
        stats = recorder.stats()
        file_bytes = os.path.getsize(path)
        log_s = duration_s

        context = zmq.Context()
        publisher = Publisher(context, f"ipc://{tmp}/replay.ipc")
        started_ns = clock.now_ns()
        published = publish_log(path, publisher.send_parts, clock, fast=True)
        publish_wall_s = (clock.now_ns() - started_ns) / 1e9
        publisher.close()
        context.term()

        started_ns = clock.now_ns()
        replayed = replay_through_node(path, load_config())
        node_wall_s = (clock.now_ns() - started_ns) / 1e9
    counts = dict(index)
    return {
        "duration_s": duration_s,
        "streams": {"camera.front": "30 fps 640x480 rgb8 (simulated face + noise sigma "
                    f"{_NOISE_STD})", "audio.mic0": "16 kHz int16 mono, 10 ms chunks",
                    "joints.arm": "500 Hz, 3 joints"},
        "messages_offered": counts,
        "recorded": stats["written"],
        "dropped": stats["dropped"],
        "peak_queue_mb": stats["peak_queued_mb"],
        "compression": "lz4",
        "raw_mb_per_s": round(raw_bytes / 2**20 / log_s, 2),
        "file_mb_per_s": round(file_bytes / 2**20 / log_s, 2),
        "recorder_cpu_s_per_log_s": round((stats["cpu_s"] + offer_cpu_ns / 1e9) / log_s, 3),
        "writer_thread_cpu_s_per_log_s": round(stats["cpu_s"] / log_s, 3),
        "offer_cpu_us_per_message": round(offer_cpu_ns / 1e3 / max(sum(counts.values()), 1),
                                          2),
        "file_mb": round(file_bytes / 2**20, 1),
        "replay_publish_x_realtime": round(published.log_duration_ns / 1e9 / publish_wall_s, 1),
        "replay_through_node_x_realtime": round(replayed.log_duration_ns / 1e9 / node_wall_s,
                                                2),
        "replay_through_node_predictions": replayed.predictions,
    }

