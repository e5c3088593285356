"""`fusion-node view`: a live node or a log in Rerun (fusion_node.view.rerun), or a log as
one PNG (`--snapshot`, fusion_node.view.snapshot).

rerun-sdk and matplotlib are optional dependencies (`pip install fusion-node[view]`): they
are imported only when the command runs, so `fusion-node --help` works without them, and
`--snapshot` needs only matplotlib.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

from fusion_node.cli.files import add_force, check_output
from fusion_node.errors import LOAD_FAILURES, ConfigError, load_failure

VIEW_REMEDY = "install the `view` extra: pip install 'fusion-node[view]'"

# The viewer shares the robot computer with the node: on two cores, lowering its priority
# keeps it from taking CPU the node's threads are waiting for.
DEFAULT_NICE = 10


@contextlib.contextmanager
def _stop_on_sigint(stop: threading.Event) -> Iterator[None]:
    """First SIGINT/SIGTERM ends viewing gracefully (the .rrd is finished); a second exits."""

    def handle(signum: int, _frame: Any) -> None:
        if stop.is_set():
            os._exit(128 + signum)
        stop.set()

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def add_view_parser(commands: Any) -> None:
    """Register `view` on the `fusion-node` subparsers."""
    view = commands.add_parser(
        "view", help="show a live node or a log in Rerun (camera, mouth, audio, commands, "
        "actions, joints, latency)",
        description="Without LOG: subscribe to a running node (its publish endpoint and "
        "the drivers' sockets its launch file names) and stream into Rerun. With LOG: the "
        "same from an MCAP log. --save writes an .rrd file instead of opening a viewer "
        "(headless), to open later with `rerun FILE.rrd`. --snapshot draws a log's panels "
        "into one PNG without Rerun or a display.")
    view.add_argument("log", nargs="?", metavar="LOG.mcap", help="a log to view")
    view.add_argument("--endpoint", action="append", default=[],
                      help="subscribe to this endpoint (repeatable; default: what the launch "
                      "file names: the node's pub, and the drivers' sockets when [node] "
                      "run_dir is set)")
    view.add_argument("--config", help="launch file of the node (mouth box, endpoints); "
                      "default: the log's own, else the embedded default")
    view.add_argument("--save", metavar="FILE.rrd", help="write a Rerun recording file")
    add_force(view)
    view.add_argument("--foxglove", metavar="OUT.mcap", help="with LOG: write a companion "
                      "MCAP that Foxglove shows with docs/foxglove-layout.json (alone: no "
                      "Rerun viewer is opened)")
    view.add_argument("--snapshot", metavar="OUT.png", help="with LOG: draw the viewer's "
                      "panels into one PNG (matplotlib; no Rerun viewer, no display)")
    view.add_argument("--at", type=float, metavar="SECONDS", help="with --snapshot: the "
                      "camera frame at this many seconds of sensor time from the log's start "
                      "(default: the middle of the log)")
    view.add_argument("--connect", metavar="URL", help="stream to a running Rerun viewer, "
                      "e.g. rerun+http://127.0.0.1:9876/proxy")
    view.add_argument("--duration", type=float, metavar="S",
                      help="stop after S seconds (live), or view the first S seconds (log)")
    view.add_argument("--image-stride", type=int, default=2,
                      help="log every n-th pixel of camera images (default 2: half size)")
    view.add_argument("--nice", type=int, default=DEFAULT_NICE,
                      help=f"raise the viewer's niceness by this much (default {DEFAULT_NICE})"
                      " so it yields the CPU to the node")


def run_view_command(args: argparse.Namespace) -> dict[str, Any]:
    """Run `fusion-node view`; return what the viewer received."""
    from fusion_node.config import load_config

    if args.log and args.endpoint:
        raise ConfigError("view: give a LOG or --endpoint, not both")
    if args.save and args.connect:
        raise ConfigError("view: give --save or --connect, not both")
    if args.duration is not None and not args.duration > 0:
        raise ConfigError(f"view: --duration {args.duration} must be positive")
    if args.save and not args.save.endswith(".rrd"):
        raise ConfigError(f"view: --save {args.save!r} must name an .rrd file")
    check_output(args.save, args.force, "view --save")
    check_output(args.foxglove, args.force, "view --foxglove")
    if args.foxglove and not args.log:
        raise ConfigError("view: --foxglove converts a LOG; give the log to convert")
    if args.nice < 0:
        raise ConfigError(f"view: --nice {args.nice} must be >= 0 (the viewer never runs "
                          "ahead of the node)")
    if args.snapshot is not None or args.at is not None:
        return _run_snapshot(args)
    try:
        from fusion_node.view import rerun as viewer
    except LOAD_FAILURES as exc:
        raise load_failure("view: rerun-sdk", exc, VIEW_REMEDY) from None
    if args.nice:
        os.nice(args.nice)
    config = load_config(args.config) if args.config else None
    result: dict[str, Any] = {"source": args.log or args.endpoint or "launch file endpoints"}
    if args.foxglove:
        from fusion_node.view.foxglove import export_foxglove

        exported = export_foxglove(args.log, args.foxglove, config or viewer.log_config(args.log))
        result["foxglove"] = {"path": exported.path, "messages": dict(exported.counts)}
        if not (args.save or args.connect):
            print(json.dumps(result, indent=2))
            return result
    if args.log:
        stats = viewer.view_log(args.log, config=config, save=args.save, connect=args.connect,
                                duration_s=args.duration, image_stride=args.image_stride)
    else:
        config = config or load_config(None)
        endpoints = args.endpoint or viewer.live_endpoints(config)
        stop = threading.Event()
        with _stop_on_sigint(stop):
            stats = viewer.view_live(endpoints, config, save=args.save, connect=args.connect,
                                     duration_s=args.duration, image_stride=args.image_stride,
                                     stop=stop)
    result.update(saved=args.save, **stats.summary())
    print(json.dumps(result, indent=2))
    return result


def _run_snapshot(args: argparse.Namespace) -> dict[str, Any]:
    """`view LOG --snapshot OUT.png`: matplotlib only, so it runs where Rerun cannot."""
    from fusion_node.config import load_config

    if args.snapshot is None:
        raise ConfigError("view: --at places the camera of a --snapshot; give --snapshot")
    if not args.log:
        raise ConfigError("view: --snapshot draws a LOG; give the log to draw")
    if args.save or args.connect or args.foxglove:
        raise ConfigError("view: --snapshot writes a PNG alone, not with --save, --connect "
                          "or --foxglove")
    if not args.snapshot.endswith(".png"):
        raise ConfigError(f"view: --snapshot {args.snapshot!r} must name a .png file")
    if args.at is not None and not args.at >= 0:
        raise ConfigError(f"view: --at {args.at} must be >= 0")
    check_output(args.snapshot, args.force, "view --snapshot")
    try:
        from fusion_node.view.snapshot import snapshot_log
    except LOAD_FAILURES as exc:
        raise load_failure("view --snapshot: matplotlib", exc, VIEW_REMEDY) from None
    if args.nice:
        os.nice(args.nice)
    config = load_config(args.config) if args.config else None
    result = snapshot_log(args.log, args.snapshot, config=config, at_s=args.at,
                          duration_s=args.duration)
    print(json.dumps(result, indent=2))
    return result
