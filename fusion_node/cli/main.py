"""`fusion-node` command line. Exit codes live here and nowhere else; signals become a
graceful stop in `fusion_node.host.signals` alone."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from fusion_node import __version__
from fusion_node.cli.files import add_force, check_output
from fusion_node.errors import FusionError, RunError
from fusion_node.host.allocator import reexecute_with_jemalloc
from fusion_node.host.signals import catch_early_signals, stop_on_signals, unblock_signals

if TYPE_CHECKING:
    from fusion_node.node import Node

# Commands that stop gracefully on SIGINT/SIGTERM (host/signals.py).
_STOPPABLE = ("run", "launch", "record", "replay")


def _command_of(argv: list[str]) -> str | None:
    """The subcommand, read before the parser runs: only --log-level takes a value before
    it."""
    words = iter(argv)
    for word in words:
        if word == "--log-level":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


_BACKEND_NAMES = {"onnxruntime": "ONNX Runtime", "tensorrt": "TensorRT", "torch": "torch"}
_STATUS_PERIOD_S = 1.0


def _backend_of(engine: Any) -> str:
    """The runtime an engine runs on, with what it runs in where that can vary."""
    backend = getattr(engine, "backend", "unknown backend")
    name = _BACKEND_NAMES.get(backend, backend)
    if backend == "tensorrt":
        return f"{name} {engine.precision}"
    if backend == "torch":
        return f"{name} {engine.device}"  # cpu or cuda
    return name


def _start_line(node: Node) -> str:
    """What the node publishes on, its engines and its sources, in one line."""
    config = node.config
    engines = ", ".join(f"{r.name} ({r.topic}, {_backend_of(r.engine)}, {r.rate_hz:g} Hz, "
                        f"{r.latency_ns / 1e6:g} ms latency)" for r in node.runners)
    parts = [f"publishing on {node.pub_endpoint}", f"engines: {engines or 'none'}"]
    if config.drivers:
        parts.append("drivers: " + ", ".join(
            f"{d.stream} ({d.kind}{'' if d.process else ', in-process'})"
            for d in config.drivers))
    if config.streams:
        parts.append("streams: " + ", ".join(f"{s.name} ({s.kind})" for s in config.streams)
                     + (f" from {', '.join(config.connect)}" if config.connect else ""))
    return "fusion-node: " + "; ".join(parts)


def _status_line(node: Node, uptime_s: float, published_before: dict[str, int],
                 elapsed_s: float) -> str:
    engines = []
    for runner in node.runners:
        stats = runner.stats
        rate_hz = (stats.published - published_before.get(runner.topic, 0)) / elapsed_s
        engine = f"{runner.topic} {rate_hz:.1f} Hz {stats.deadline_misses} misses"
        engines.append(engine + (f" {stats.errors} errors" if stats.errors else ""))
    # The problems node.health reports; last, so a narrow terminal cuts them, not the rates.
    problems = node.shortfalls() + [f"driver {stream}: {error}"
                                    for stream, error in node.driver_errors.items()]
    status = f"degraded: {'; '.join(problems)}" if problems else "ok"
    return " | ".join([f"fusion-node: up {uptime_s:.0f} s", *engines, status])


class _LiveLine:
    """One line on a terminal, rewritten in place. A log record clears it first, so that it
    does not land on the line's end; the next refresh draws the line again."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._shown = 0  # characters of the line on screen now
        self._lock = threading.Lock()  # engine threads log too

    def show(self, text: str) -> None:
        with self._lock:
            try:
                columns = os.get_terminal_size(self._stream.fileno()).columns
            except OSError:
                columns = 0  # size unknown: do not cut
            if columns > 1:  # a wrapped line could not be rewritten: \r goes back one row
                text = text[:columns - 1]
            self._stream.write("\r" + text.ljust(self._shown))
            self._stream.flush()
            self._shown = len(text)

    def clear(self) -> None:
        with self._lock:
            if self._shown:
                self._stream.write("\r" + " " * self._shown + "\r")
                self._stream.flush()
                self._shown = 0

    def filter(self, record: logging.LogRecord) -> bool:
        self.clear()
        return True


async def _report_status(node: Node, stop: asyncio.Event, live: bool) -> None:
    """The start line once the node is up; then, if `live`, a status line refreshed in place
    every second until `stop`, and cleared."""
    started_ns = node.clock.now_ns()
    await node.ready.wait()  # the endpoint as bound and the engines as built are known now
    print(_start_line(node), file=sys.stderr, flush=True)
    if not live:
        return
    line = _LiveLine(sys.stderr)
    handlers = [h for h in logging.getLogger().handlers
                if isinstance(h, logging.StreamHandler) and h.stream is sys.stderr]
    for handler in handlers:
        handler.addFilter(line.filter)
    try:
        published = {r.topic: r.stats.published for r in node.runners}
        then_ns = node.clock.now_ns()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _STATUS_PERIOD_S)
            if stop.is_set():
                return
            now_ns = node.clock.now_ns()
            line.show(_status_line(node, (now_ns - started_ns) / 1e9, published,
                                   (now_ns - then_ns) / 1e9))
            published = {r.topic: r.stats.published for r in node.runners}
            then_ns = now_ns
    finally:
        for handler in handlers:
            handler.removeFilter(line.filter)
        line.clear()  # the final summary starts on a clean line


async def _run_node(args: argparse.Namespace) -> None:
    from fusion_node.config import load_config
    from fusion_node.node import Node

    config = load_config(args.config)
    if args.pub:
        config = dataclasses.replace(config, pub=args.pub)
    if getattr(args, "record", None):
        from fusion_node.cli.log import with_record

        config = with_record(config, args)
    if config.record is not None:  # --record, or the launch file's [record] table
        check_output(config.record.path, config.record.overwrite, "record path")
    observers = []
    if config.view.foxglove is not None:  # serving before anything starts: a port in use fails
        from fusion_node.view.foxglove_live import FoxgloveServer

        observers.append(FoxgloveServer(*config.view.foxglove, config))
    node = Node(config, observers=observers)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # On stderr: stdout stays for what scripts read. The live line only on a terminal: in a
    # journal or a CI log every refresh would be a line of its own.
    status = None if getattr(args, "quiet", False) else asyncio.create_task(
        _report_status(node, stop, live=sys.stderr.isatty()), name="status")
    with stop_on_signals(stop):
        if args.duration is not None:
            loop.call_later(args.duration, stop.set)
        try:
            await node.run(stop)
        finally:
            if status is not None:  # done after a stop; after a failed start, still waiting
                status.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await status
    print(json.dumps(node.health()["engines"]), file=sys.stderr)
    shortfalls = node.shortfalls()
    if shortfalls:  # systemd and scripts must not read this as a good run
        raise RunError(f"the run did not produce what {args.config or 'the embedded default'} "
                       f"asks for: {'; '.join(shortfalls)}")
    published = ", ".join(f"{r.topic} {r.stats.published}" for r in node.runners)
    misses = sum(r.stats.deadline_misses for r in node.runners)
    print(f"fusion-node: published {published}; {misses} deadline misses", file=sys.stderr)


def _jsonable(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.ndarray):
        if value.size <= 4096:
            return value.tolist()
        return {"dtype": value.dtype.name, "shape": list(value.shape)}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _echo(args: argparse.Namespace) -> None:
    import zmq

    from fusion_node.clock import MonotonicClock
    from fusion_node.transport import Subscriber

    context = zmq.Context()
    # Every topic, filtered here by prefix as ZeroMQ would: a wrong topic then gets the
    # topics that are there, not only a timeout.
    subscriber = Subscriber(context, [args.endpoint], MonotonicClock(), topics=[""])
    seen: set[str] = set()
    received = 0
    try:
        while args.count is None or received < args.count:
            deadline = time.monotonic() + args.timeout
            msg = None
            while msg is None and (left_s := deadline - time.monotonic()) > 0:
                msg = subscriber.recv(timeout_ms=max(1, int(left_s * 1000)))
                if msg is not None:
                    seen.add(msg.stream)
                    if not msg.stream.startswith(args.topic):
                        msg = None
            if msg is None:
                there = (f"topics seen there: {', '.join(sorted(seen))}" if seen
                         else "nothing was published there (is the node running?)")
                raise FusionError(f"no message on {args.topic!r} from {args.endpoint} within "
                                  f"{args.timeout} s; {there}")
            received += 1
            record = {"type": type(msg).__name__.lower(),
                      **_jsonable({f.name: getattr(msg, f.name)
                                   for f in dataclasses.fields(msg)})}
            if args.json:
                print(json.dumps(record), flush=True)
            else:
                summary = {k: v for k, v in record.items() if not isinstance(v, (list, dict))}
                # A prediction's own values (command, voice activity, ...), not only stamps.
                summary.update({k: v for k, v in record.get("fields", {}).items()
                                if not isinstance(v, (list, dict))})
                print(" ".join(f"{k}={v}" for k, v in summary.items()), flush=True)
    finally:
        subscriber.close()
        context.term()


ENDPOINT_ENV = "FUSION_NODE_ENDPOINT"
LOG_LEVEL_ENV = "FUSION_NODE_LOG_LEVEL"
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5599"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a log level ({', '.join(LOG_LEVELS)};"
                                         f" also read from ${LOG_LEVEL_ENV})")
    return text.upper()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusion-node", description="Real-time sensor fusion: sensors in, "
        "fixed-latency predictions out.")
    parser.add_argument("--log-level", default=os.environ.get(LOG_LEVEL_ENV, "INFO"),
                        type=_log_level, help=f"DEBUG, INFO, WARNING, ERROR (default: "
                        f"${LOG_LEVEL_ENV}, else INFO)")
    parser.add_argument("--version", action="version", version=f"fusion-node {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run drivers, engines and the publisher")
    run.add_argument("--config", help="launch file (TOML); default: the embedded simulated "
                     "robot")
    run.add_argument("--duration", type=float, help="stop after this many seconds")
    run.add_argument("--pub", default=os.environ.get(ENDPOINT_ENV),
                     help=f"endpoint for pred.* and node.health (default: ${ENDPOINT_ENV}, "
                     f"else {DEFAULT_ENDPOINT})")
    add_force(run)
    run.add_argument("--record", metavar="OUT.mcap", help="record sensors, predictions and "
                     "health to an MCAP log (see `fusion-node record --help`)")
    run.add_argument("--quiet", action="store_true",
                     help="no start line (endpoint, engines, drivers) and no live status; "
                     "the final summary and errors still go to stderr")

    launch = commands.add_parser("launch", help="run the node from a launch file "
                                 "(the same as run --config FILE)")
    launch.add_argument("config", help="launch file (TOML), e.g. launch/sim.toml")
    launch.add_argument("--duration", type=float, help="stop after this many seconds")
    launch.add_argument("--pub", default=os.environ.get(ENDPOINT_ENV),
                        help=f"override the launch file's publish endpoint (default: "
                        f"${ENDPOINT_ENV}, else the launch file's)")
    launch.add_argument("--quiet", action="store_true",
                        help="no start line (endpoint, engines, drivers) and no live status; "
                        "the final summary and errors still go to stderr")

    top = commands.add_parser("top", help="show node.health as a live table")
    top.add_argument("--endpoint", default=os.environ.get(ENDPOINT_ENV, DEFAULT_ENDPOINT),
                     help=f"the node's publisher (default: ${ENDPOINT_ENV}, else "
                     f"{DEFAULT_ENDPOINT})")
    top.add_argument("--once", action="store_true", help="print one table and exit")

    echo = commands.add_parser("echo", help="print decoded messages from a topic")
    echo.add_argument("topic", help="topic or topic prefix, e.g. pred.speech")
    echo.add_argument("--endpoint", default=os.environ.get(ENDPOINT_ENV, DEFAULT_ENDPOINT),
                      help=f"the node's publisher (default: ${ENDPOINT_ENV}, else "
                      f"{DEFAULT_ENDPOINT})")
    echo.add_argument("--count", type=int, help="exit after this many messages")
    echo.add_argument("--json", action="store_true", help="one JSON object per line")
    echo.add_argument("--timeout", type=float, default=10.0,
                      help="fail if no message arrives for this many seconds")

    from fusion_node.cli.bench import add_bench_parser

    add_bench_parser(commands)
    from fusion_node.cli.engine import add_engine_parser

    add_engine_parser(commands)
    from fusion_node.cli.log import add_log_parsers

    add_log_parsers(commands)
    from fusion_node.cli.calibrate import add_calibrate_parser

    add_calibrate_parser(commands)
    from fusion_node.cli.view import add_view_parser

    add_view_parser(commands)
    from fusion_node.cli.keys import add_keys_parser

    add_keys_parser(commands)
    from fusion_node.cli.eval import add_eval_parser

    add_eval_parser(commands)
    from fusion_node.cli.check import add_check_parser

    add_check_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None and _command_of(sys.argv[1:]) in _STOPPABLE:
        catch_early_signals()  # before the parser, the imports and the node's start-up
    elif argv is None:
        unblock_signals()  # Ctrl-C and SIGTERM stop a re-executed bench and its children
    args = build_parser().parse_args(argv)
    if argv is None and args.command in ("run", "launch", "bench"):  # a process of its own
        reexecute_with_jemalloc(sys.argv[1:])
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command in ("run", "launch"):
            asyncio.run(_run_node(args))
        elif args.command == "top":
            from fusion_node.cli.top import run_top

            run_top(args.endpoint, args.once)
        elif args.command == "echo":
            _echo(args)
        elif args.command in ("record", "replay", "log"):
            from fusion_node.cli.log import run_log_command

            return run_log_command(args, _run_node)
        elif args.command == "calibrate":
            from fusion_node.cli.calibrate import run_calibrate_command

            print(json.dumps(run_calibrate_command(args), indent=2))
        elif args.command == "keys":
            from fusion_node.cli.keys import run_keys_command

            print(json.dumps(run_keys_command(args), indent=2))
        elif args.command == "engine":
            from fusion_node.cli.engine import run_engine_command

            print(json.dumps(run_engine_command(args), indent=2))
        elif args.command == "eval":
            from fusion_node.cli.eval import run_eval_command

            report = run_eval_command(args)
            print(json.dumps(report) if args.json else json.dumps(report, indent=2))
        elif args.command == "check":
            from fusion_node.cli.check import run_check_command

            print(json.dumps(run_check_command(args), indent=2))
        elif args.command == "view":
            from fusion_node.cli.view import run_view_command

            run_view_command(args)
        else:
            from fusion_node.cli.bench import run_bench_command

            run_bench_command(args)
    except FusionError as exc:
        print(f"fusion-node: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `fusion-node echo ... | head` closing the pipe is a normal way to stop.
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
