"""`python -m drivers`: run one driver as its own process, publishing on a ZeroMQ endpoint.

Exits 0 when a finite source ends or on SIGTERM/SIGINT (after disconnecting the driver), and
1 with one error line on a configuration or device error.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import signal
import sys
from typing import Any

import zmq

from drivers.process import publish_driver
from drivers.registry import KINDS, create_driver
from fusion_node.clock import MonotonicClock
from fusion_node.errors import ConfigError, DriverError
from fusion_node.host.signals import cancel_on_signals
from fusion_node.transport import DEFAULT_SHM, Publisher


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m drivers",
        description="Run one sensor driver and publish its samples (the publisher binds).")
    parser.add_argument("--kind", required=True, choices=KINDS, help="driver kind")
    parser.add_argument("--stream", required=True, help="stream name, e.g. camera.front")
    parser.add_argument("--endpoint", required=True, help="endpoint to bind, e.g. ipc://...")
    parser.add_argument("--config", default="{}", help="driver config as a JSON object")
    parser.add_argument("--no-shared-memory", action="store_true",
                        help="send large payloads inline, for subscribers that cannot map "
                        "shared memory (another host, C++ clients)")
    return parser.parse_args(argv)


def _parse_config(text: str) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--config is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--config must be a JSON object, got {text!r}")
    return config


async def _serve(args: argparse.Namespace, config: dict[str, Any]) -> None:
    driver = create_driver(args.kind, args.stream, config, MonotonicClock())
    context = zmq.Context()
    try:
        publisher = Publisher(context, args.endpoint,
                              shm=None if args.no_shared_memory else DEFAULT_SHM)
        try:
            task = asyncio.current_task()
            if task is None:  # asyncio.run always runs us in a task
                raise RuntimeError("_serve must run in a task")
            with cancel_on_signals(task):
                await publish_driver(driver, publisher)
        finally:
            publisher.close()
    finally:
        context.term()


_PR_SET_PDEATHSIG = 1


def _stop_with_parent() -> None:
    """Have the kernel send SIGTERM when the process that started this driver dies (a node
    killed with SIGKILL): an orphaned driver would keep its device open and publish into
    nothing. The usual SIGTERM path then disconnects the driver cleanly."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the supervisor's SIGTERM still applies
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = _parse_args(argv)
    _stop_with_parent()
    try:
        asyncio.run(_serve(args, _parse_config(args.config)))
    except asyncio.CancelledError:
        pass  # stopped by a signal, after a clean disconnect
    except (ConfigError, DriverError) as exc:
        print(f"drivers: {args.kind} {args.stream!r}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
