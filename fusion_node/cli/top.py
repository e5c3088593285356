"""`fusion-node top`: the node's health as a live table in the terminal."""

from __future__ import annotations

import sys
from typing import Any

import zmq

from fusion_node.clock import MonotonicClock
from fusion_node.errors import FusionError
from fusion_node.protocol import Health
from fusion_node.transport import Subscriber

_CLEAR = "\x1b[H\x1b[2J"


def _ms(summary: dict[str, Any] | None, key: str) -> str:
    if not summary or key not in summary:
        return "-"
    return f"{summary[key]:.2f}"


def render(stats: dict[str, Any]) -> str:
    """One screen of text from a `node.health` stats map (unknown keys are ignored)."""
    drivers = stats.get("drivers", {})
    jitter = stats.get("publish_jitter")
    lines = [(f"fusion-node  up {stats.get('uptime_s', 0):.0f} s   "
              f"publisher {stats.get('publisher_priority', '-')}   "
              f"publish − deadline p50 {_ms(jitter, 'p50_ms')} p99 {_ms(jitter, 'p99_ms')} "
              f"max {_ms(jitter, 'max_ms')} ms"), ""]
    lines.append(f"{'stream':<16}{'rate Hz':>9}{'received':>10}{'age ms':>9}{'lost':>7}"
                 f"{'too old':>9}{'dup':>6}{'clock ±ms':>10}  driver")
    for name, stream in stats.get("streams", {}).items():
        driver = drivers.get(name, {})
        state = driver.get("state", "")
        if driver.get("restarts"):
            state += f" ({driver['restarts']} restarts)"
        if driver.get("error"):
            state += f" error: {driver['error']}"
        age = stream.get("age_ms")
        uncertainty = stream.get("clock", {}).get("uncertainty_ms")
        clock = "-" if uncertainty is None else f"{uncertainty:.2f}"
        lines.append(f"{name:<16}{stream.get('rate_hz', 0):>9.1f}{stream.get('received', 0):>10}"
                     f"{'-' if age is None else f'{age:.1f}':>9}{stream.get('seq_gaps', 0):>7}"
                     f"{stream.get('too_old', 0):>9}{stream.get('duplicates', 0):>6}"
                     f"{clock:>10}  {state}")
    lines += ["", (f"{'engine':<10}{'published':>10}{'late':>6}{'skipped':>8}{'missing':>8}"
                   f"{'infer p50':>10}{'p99':>7}{'ready p50':>10}{'p99':>7}  priority")]
    for name, engine in stats.get("engines", {}).items():
        lines.append(f"{name:<10}{engine.get('published', 0):>10}"
                     f"{engine.get('deadline_misses', 0):>6}{engine.get('skipped_ticks', 0):>8}"
                     f"{engine.get('missing_required', 0):>8}"
                     f"{_ms(engine.get('infer'), 'p50_ms'):>10}"
                     f"{_ms(engine.get('infer'), 'p99_ms'):>7}"
                     f"{_ms(engine.get('ready_after_ref'), 'p50_ms'):>10}"
                     f"{_ms(engine.get('ready_after_ref'), 'p99_ms'):>7}"
                     f"  {engine.get('priority', '-')}")
        if engine.get("last_missing"):
            lines.append(f"{'':<10}missing: {engine['last_missing']}")
    rejected = stats.get("rejected", {})
    if rejected:
        lines += ["", "rejected: " + ", ".join(f"{k} {v}" for k, v in sorted(rejected.items()))]
    return "\n".join(lines)


def run_top(endpoint: str, once: bool, timeout_s: float = 5.0) -> None:
    """Redraw the table at each `node.health`; with `once`, print one table and return."""
    context = zmq.Context()
    subscriber = Subscriber(context, [endpoint], MonotonicClock(), topics=["node.health"])
    try:
        while True:
            msg = subscriber.recv(timeout_ms=int(timeout_s * 1000))
            if msg is None:
                raise FusionError(f"no node.health from {endpoint} within {timeout_s} s")
            if not isinstance(msg, Health):
                continue
            table = render(msg.stats)
            if once:
                print(table)
                return
            sys.stdout.write(_CLEAR + table + "\n")
            sys.stdout.flush()
    finally:
        subscriber.close()
        context.term()
