"""`fusion-node` command line. Signals and exit codes live here and nowhere else."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

from fusion_node.allocator import reexecute_with_jemalloc
from fusion_node.errors import FusionError


@contextlib.contextmanager
def _stop_on_signals(loop: asyncio.AbstractEventLoop,
                     stop: asyncio.Event) -> Iterator[None]:
    """First SIGINT/SIGTERM stops gracefully; a second one exits at once."""

    def handle(signum: int) -> None:
        if stop.is_set():
            os._exit(128 + signum)
        logging.getLogger("fusion_node").info("%s: shutting down",
                                              signal.Signals(signum).name)
        stop.set()

    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, handle, signum)
    try:
        yield
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


async def _run_node(args: argparse.Namespace) -> None:
    from fusion_node.config import load_config
    from fusion_node.node import Node

    config = load_config(args.config)
    if args.pub:
        config = dataclasses.replace(config, pub=args.pub)
    if getattr(args, "record", None):
        from fusion_node.cli_log import with_record

        config = with_record(config, args)
    node = Node(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with _stop_on_signals(loop, stop):
        if args.duration is not None:
            loop.call_later(args.duration, stop.set)
        await node.run(stop)
    print(json.dumps(node.health()["engines"]), file=sys.stderr)


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
    subscriber = Subscriber(context, [args.endpoint], MonotonicClock(), topics=[args.topic])
    received = 0
    try:
        while args.count is None or received < args.count:
            msg = subscriber.recv(timeout_ms=int(args.timeout * 1000))
            if msg is None:
                raise FusionError(f"no message on {args.topic!r} from {args.endpoint} within "
                                  f"{args.timeout} s")
            received += 1
            record = {"type": type(msg).__name__.lower(),
                      **_jsonable({f.name: getattr(msg, f.name)
                                   for f in dataclasses.fields(msg)})}
            if args.json:
                print(json.dumps(record), flush=True)
            else:
                summary = {k: v for k, v in record.items() if not isinstance(v, (list, dict))}
                print(" ".join(f"{k}={v}" for k, v in summary.items()), flush=True)
    finally:
        subscriber.close()
        context.term()


def _bench(args: argparse.Namespace) -> None:
    # With --plot, the benches also hand back their raw samples (never printed).
    samples: dict[str, Any] | None = None
    if args.plot:
        from fusion_node.plots import check_plot_request

        check_plot_request(args.what, args.plot)
        samples = {}
    if args.what == "transport":
        from fusion_node.bench_transport import run_transport_bench

        result = run_transport_bench(count=args.count, samples=samples)
    elif args.what == "engines":
        from fusion_node.cli_engine import run_engine_bench

        result = run_engine_bench(iterations=args.iterations, samples=samples)
    elif args.what == "clock":
        from fusion_node.cli_calibrate import run_clock_bench

        result = run_clock_bench(duration_s=args.duration)
    elif args.what == "client":
        from fusion_node.bench_client import run_client_bench

        result = run_client_bench(duration_s=args.duration)
    elif args.what == "fuzz":
        from fusion_node.fuzz import run_fuzz_bench

        result = run_fuzz_bench(inputs=args.inputs, seconds=args.seconds, seed=args.seed)
    elif args.what == "record":
        from fusion_node.cli_log import run_record_bench

        result = run_record_bench(duration_s=args.duration)
    elif args.what == "soak":
        from fusion_node.bench_soak import run_soak_bench

        result = run_soak_bench(minutes=args.minutes, faults=tuple(args.faults.split(",")))
    else:
        from fusion_node.bench_pipeline import run_pipeline_bench

        result = run_pipeline_bench(duration_s=args.duration, samples=samples)
    print(json.dumps(result, indent=None if args.json else 2))
    if args.plot and samples is not None:
        from fusion_node.plots import plot_bench

        for path in plot_bench(args.what, result, samples, args.plot):
            print(f"wrote {path}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusion-node", description="Real-time sensor fusion: sensors in, "
        "fixed-latency predictions out.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run drivers, engines and the publisher")
    run.add_argument("--config", help="launch file (TOML); default: the embedded simulated "
                     "robot")
    run.add_argument("--duration", type=float, help="stop after this many seconds")
    run.add_argument("--pub", help="endpoint for pred.* and node.health "
                     "(default tcp://127.0.0.1:5599)")
    run.add_argument("--record", metavar="OUT.mcap", help="record sensors, predictions and "
                     "health to an MCAP log (see `fusion-node record --help`)")

    launch = commands.add_parser("launch", help="run the node from a launch file "
                                 "(the same as run --config FILE)")
    launch.add_argument("config", help="launch file (TOML), e.g. launch/sim.toml")
    launch.add_argument("--duration", type=float, help="stop after this many seconds")
    launch.add_argument("--pub", help="override the launch file's publish endpoint")

    top = commands.add_parser("top", help="show node.health as a live table")
    top.add_argument("--endpoint", default="tcp://127.0.0.1:5599")
    top.add_argument("--once", action="store_true", help="print one table and exit")

    echo = commands.add_parser("echo", help="print decoded messages from a topic")
    echo.add_argument("topic", help="topic or topic prefix, e.g. pred.speech")
    echo.add_argument("--endpoint", default="tcp://127.0.0.1:5599")
    echo.add_argument("--count", type=int, help="exit after this many messages")
    echo.add_argument("--json", action="store_true", help="one JSON object per line")
    echo.add_argument("--timeout", type=float, default=10.0,
                      help="fail if no message arrives for this many seconds")

    bench = commands.add_parser("bench", help="measure transport, pipeline or engine "
                                "performance")
    bench.add_argument("what", choices=("transport", "pipeline", "engines", "record",
                                               "clock", "client", "fuzz", "soak"))
    bench.add_argument("--json", action="store_true", help="one-line JSON")
    bench.add_argument("--count", type=int, default=2000, help="messages per kind (transport)")
    bench.add_argument("--duration", type=float, default=20.0,
                       help="seconds (pipeline, record, clock)")
    bench.add_argument("--iterations", type=int, default=200,
                       help="timed calls per backend (engines)")
    bench.add_argument("--inputs", type=int, default=1_000_000,
                       help="protocol decoder inputs (fuzz)")
    bench.add_argument("--seconds", type=float, default=20.0,
                       help="seconds for each other target: shm, launch, calibration, "
                            "mcap (fuzz)")
    bench.add_argument("--seed", type=int, default=0, help="mutation seed (fuzz)")
    bench.add_argument("--minutes", type=float, default=30.0,
                       help="minutes of the default node under injected faults (soak)")
    bench.add_argument("--faults",
                       default="camera,stall,overrun,flood,raise,hang,shm_attack,future",
                       help="comma-separated faults the soak injects (soak; to find which "
                       "one a figure comes from)")
    bench.add_argument("--plot", metavar="DIR", help="also write PNG plots and the JSON "
                       "into DIR (transport, pipeline, engines; needs matplotlib)")
    from fusion_node.cli_engine import add_engine_parser

    add_engine_parser(commands)
    from fusion_node.cli_log import add_log_parsers

    add_log_parsers(commands)
    from fusion_node.cli_calibrate import add_calibrate_parser

    add_calibrate_parser(commands)
    from fusion_node.cli_view import add_view_parser

    add_view_parser(commands)
    from fusion_node.cli_keys import add_keys_parser

    add_keys_parser(commands)
    from fusion_node.cli_eval import add_eval_parser

    add_eval_parser(commands)
    from fusion_node.cli_check import add_check_parser

    add_check_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.command in ("run", "launch", "bench"):  # a process of its own
        reexecute_with_jemalloc(sys.argv[1:])
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command in ("run", "launch"):
            asyncio.run(_run_node(args))
        elif args.command == "top":
            from fusion_node.top import run_top

            run_top(args.endpoint, args.once)
        elif args.command == "echo":
            _echo(args)
        elif args.command in ("record", "replay", "log"):
            from fusion_node.cli_log import run_log_command

            return run_log_command(args, _run_node)
        elif args.command == "calibrate":
            from fusion_node.cli_calibrate import run_calibrate_command

            print(json.dumps(run_calibrate_command(args), indent=2))
        elif args.command == "keys":
            from fusion_node.cli_keys import run_keys_command

            print(json.dumps(run_keys_command(args), indent=2))
        elif args.command == "engine":
            from fusion_node.cli_engine import run_engine_command

            print(json.dumps(run_engine_command(args), indent=2))
        elif args.command == "eval":
            from fusion_node.cli_eval import run_eval_command

            report = run_eval_command(args)
            print(json.dumps(report) if args.json else json.dumps(report, indent=2))
        elif args.command == "check":
            from fusion_node.cli_check import run_check_command

            print(json.dumps(run_check_command(args), indent=2))
        elif args.command == "view":
            from fusion_node.cli_view import run_view_command

            run_view_command(args)
        else:
            _bench(args)
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
