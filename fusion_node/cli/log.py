"""`fusion-node record`, `replay`, `log info`, `log recover`, `log export` and `bench record`.

Recording has two modes:
  - without `--endpoint`, `record OUT.mcap` runs the node (the embedded default, or
    `--config`) and records inside it, exactly as `run --record OUT.mcap` or a launch file's
    `[record]` table do: every sensor message as the node received it, every prediction and
    `node.health` as it published them, with the node's own receive times;
  - with `--endpoint E ...`, it subscribes to running publishers (a node's `--pub`, drivers'
    endpoints) and records the bytes it receives, with its own receive times.
`replay` also takes a rosbag2 (fusion_node.ros2.rosbag2), and `log export --ros2` writes one.
Heavy modules (mcap, the node, the engines) are imported by the handlers, not here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from fusion_node.cli.files import add_force, check_output
from fusion_node.errors import ReplayError
from fusion_node.host.signals import stop_on_signals


def add_log_parsers(commands: Any) -> None:
    """Register `record`, `replay` and `log` on the `fusion-node` subparsers."""
    record = commands.add_parser(
        "record", help="record sensors and predictions to an MCAP log",
        description="Without --endpoint: run the node (--config, default the embedded "
        "simulated robot) and record inside it. With --endpoint: record what running "
        "publishers send.")
    record.add_argument("record", metavar="OUT.mcap", help="log to write")
    add_force(record)
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
    replay.add_argument("log", metavar="LOG.mcap",
                        help="a fusion-node log, or a rosbag2 (bag folder, .mcap or .db3) of "
                        "camera, audio and joint topics, read as the launch file's [replay] "
                        "ros2 table and ros2 drivers map them; its header stamps are the "
                        "sensor times")
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
    add_force(replay)
    replay.add_argument("--verify", action="store_true",
                        help="compare the predictions with those in the log; exit 1 on the "
                        "first difference (implies --through-node)")
    replay.add_argument("--tolerance", type=float, default=0.0, metavar="ABS",
                        help="--verify: let float outputs differ by up to ABS (default 0: bit "
                        "for bit, which holds on the machine that recorded the log; ONNX "
                        "Runtime's kernels differ by CPU, so another machine may need 1e-6)")
    replay.add_argument("--timing", choices=("log", "schedule"), default="log",
                        help="--through-node: tick when the recording node cut each window "
                        "(log, default) or at t_ref + align delay (schedule)")

    log = commands.add_parser("log", help="inspect or recover a log")
    actions = log.add_subparsers(dest="log_command", required=True)
    info = actions.add_parser("info", help="topics, counts, rates, duration, gaps, drops")
    info.add_argument("log", metavar="LOG.mcap")
    info.add_argument("--json", action="store_true", help="one JSON object")
    export = actions.add_parser(
        "export", help="write a log as a rosbag2 (MCAP storage, ros2msg schemas, CDR)",
        description="Every sensor message, prediction and node.health of the log, as ROS 2 "
        "messages (sensor_msgs Image and JointState, diagnostic_msgs DiagnosticArray, "
        "fusion_node_msgs for audio and predictions), each at its sensor time.")
    export.add_argument("log", metavar="LOG.mcap")
    export.add_argument("--ros2", required=True, metavar="OUT",
                        help="the bag to write: a bag folder (metadata.yaml + OUT.mcap), or "
                        "one MCAP file if OUT ends in .mcap")
    export.add_argument("--compression", choices=("zstd", "none"), default="zstd",
                        help="MCAP chunk compression (default zstd; raw images are large)")
    add_force(export)
    recover = actions.add_parser("recover", help="copy every whole chunk of a broken log "
                                 "into a complete, indexed one")
    recover.add_argument("broken", metavar="BROKEN.mcap")
    recover.add_argument("fixed", metavar="FIXED.mcap")
    add_force(recover)


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
    if getattr(args, "force", False):
        options["overwrite"] = True
    given = {name: value for name, value in options.items() if value is not None}
    return dataclasses.replace(base or RecordConfig(args.record), path=args.record, **given)


def with_record(config: Any, args: argparse.Namespace) -> Any:
    """`config` recording to `args.record` (`run --record`, or `record` without
    --endpoint)."""
    return dataclasses.replace(config, record=_record_config(args, config.record))


def _record_endpoints(args: argparse.Namespace) -> int:
    import zmq

    from fusion_node.clock import MonotonicClock
    from fusion_node.logs.recorder import Recorder, record_endpoints_blocking

    clock = MonotonicClock()
    record = _record_config(args)
    recorder = Recorder(record.path, clock, topics=record.topics,
                        compression=record.compression, chunk_size=record.chunk_size,
                        preview_hz=record.preview_hz, flush_interval_ns=record.flush_interval_ns,
                        metadata={"source": "subscriber", "endpoints": json.dumps(args.endpoint)},
                        overwrite=record.overwrite)
    context = zmq.Context()
    stop = threading.Event()
    end_ns = None if args.duration is None else clock.now_ns() + round(args.duration * 1e9)
    recorder.start()
    try:
        with stop_on_signals(stop):
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


def _replay_through_node(args: argparse.Namespace, log: str | None = None,
                         config_and_source: tuple[Any, str] | None = None) -> int:
    """`replay --through-node`; `log` is what to read when it is not `args.log` (a rosbag2
    converted to a log)."""
    from fusion_node.clock import MonotonicClock
    from fusion_node.logs.replay import replay_config, replay_through_node

    clock = MonotonicClock()
    config, source = config_and_source or replay_config(args.log, args.config)
    started_ns = clock.now_ns()
    result = replay_through_node(log or args.log, config, out_path=args.out, verify=args.verify,
                                 tolerance=args.tolerance, timing=args.timing,
                                 config_source=source, log_name=args.log)
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


def _replay_rosbag2(args: argparse.Namespace, through_node: bool) -> int:
    """`replay BAG`: the bag's mapped topics are written into a temporary fusion-node log,
    which is then replayed like any other (one replay engine, the same determinism)."""
    import os
    import tempfile

    from fusion_node.config import load_config
    from fusion_node.ros2.rosbag2 import bag_to_log, input_streams, replay_topics

    config = load_config(args.config)
    source = args.config or "the embedded default"
    with tempfile.TemporaryDirectory(prefix="fusion-node-rosbag2-") as folder:
        log = os.path.join(folder, "converted.mcap")
        counts = bag_to_log(args.log, log, input_streams(config), *replay_topics(config))
        print(f"fusion-node replay: read {json.dumps(counts)} from rosbag2 {args.log}",
              file=sys.stderr, flush=True)
        try:
            if through_node:
                return _replay_through_node(args, log, (config, source))
            return _publish(args, log)
        except ReplayError as exc:  # name the bag, not the temporary copy
            raise ReplayError(str(exc).replace(log, args.log)) from None


def _publish(args: argparse.Namespace, log: str | None = None) -> int:
    import zmq

    from fusion_node.clock import MonotonicClock
    from fusion_node.logs.replay import publish_log
    from fusion_node.transport import Publisher

    clock = MonotonicClock()
    context = zmq.Context()
    stop = threading.Event()
    publisher = Publisher(context, args.pub)
    try:
        with stop_on_signals(stop):
            stop.wait(args.start_delay)  # ZeroMQ drops what is sent before a subscriber joins
            started_ns = clock.now_ns()
            stats = publish_log(log or args.log, publisher.send_parts, clock, rate=args.rate,
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
            check_output(args.record, args.force, "record")
            return _record_endpoints(args)
        if args.duration is None:
            print("fusion-node record: running the node until Ctrl-C", file=sys.stderr)
        import asyncio

        asyncio.run(run_node(args))
        return 0
    if args.command == "replay":
        from fusion_node.ros2.rosbag2 import is_rosbag2

        through_node = bool(args.through_node or args.verify or args.out)
        if through_node:
            check_output(args.out, args.force, "replay --out")
        if is_rosbag2(args.log):
            return _replay_rosbag2(args, through_node)
        if through_node:
            return _replay_through_node(args)
        return _publish(args)
    if args.log_command == "info":
        from fusion_node.logs.inspect import format_info, log_info

        info = log_info(args.log)
        print(json.dumps(info) if args.json else format_info(info))
        return 0
    if args.log_command == "export":
        from fusion_node.ros2.rosbag2 import export_log

        export = export_log(args.log, args.ros2, force=args.force,
                            compression=args.compression)
        print(json.dumps({"log": args.log, "ros2": export.out, "messages": export.messages,
                          "duration_s": round(export.duration_ns / 1e9, 3),
                          "topics": export.topics}))
        return 0
    from fusion_node.logs.inspect import recover

    check_output(args.fixed, args.force, "log recover")
    result = recover(args.broken, args.fixed)
    state = "complete" if result.was_complete else f"stopped at byte {result.read_bytes} of " \
        f"{result.input_bytes}: {result.stop_reason}"
    print(f"recovered {result.messages} messages on {len(result.topics)} topics into "
          f"{args.fixed} ({state})")
    return 0
