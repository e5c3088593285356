"""`fusion-node bench client`: what `Client.latest()` costs a control loop.

A publisher process sends predictions of the default shapes at the node's rates while this
process polls `latest("pred.action")` at 1 kHz, as a control loop would.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from typing import Any

import numpy as np

from fusion_node.clock import MonotonicClock
from fusion_node.progress import progress_seconds
from fusion_node.protocol import Prediction

_MS = 1_000_000


def _prediction(topic: str, seq: int, t_ref_ns: int) -> Prediction:
    arrays: dict[str, np.ndarray]
    if topic == "pred.action":
        arrays = {"actions": np.zeros((20, 3), np.float32),
                  "step_times_ns": t_ref_ns + 20 * _MS * np.arange(1, 21, dtype=np.int64)}
    else:
        arrays = {"voice_activity": np.zeros(16, np.float32),
                  "active_speaker": np.zeros(16, np.float32),
                  "command_posterior": np.full(17, 1 / 17, np.float32)}
    return Prediction(topic, seq, t_ref_ns, t_ref_ns + 30 * _MS, "bench", "0" * 16,
                      {"camera.front": True}, {"command": "none"}, arrays, {})


def _publish_blocking(endpoint: str, duration_s: float) -> None:
    import zmq

    from fusion_node.transport import Publisher

    clock = MonotonicClock()
    context = zmq.Context()
    publisher = Publisher(context, endpoint)
    periods_ns = {"pred.speech": 33_333_333, "pred.action": 40_000_000}
    start = clock.now_ns()
    next_ns = dict.fromkeys(periods_ns, start)
    seqs = dict.fromkeys(periods_ns, 0)
    while clock.now_ns() - start < duration_s * 1e9:
        topic = min(next_ns, key=next_ns.__getitem__)
        clock.sleep_until(next_ns[topic])
        publisher.send(_prediction(topic, seqs[topic], next_ns[topic]))
        seqs[topic] += 1
        next_ns[topic] += periods_ns[topic]
    publisher.close()
    context.term()


def run_client_bench(duration_s: float = 10.0, rate_hz: float = 1000.0) -> dict[str, Any]:
    """Per-call cost of `latest()` (µs), and how many calls found a new chunk."""
    from fusion_node.client import Client

    # A private directory: ipc sockets in a world-writable one are refused (docs/security.md).
    endpoint = f"ipc://{tempfile.mkdtemp(prefix='fusion-node-bench-')}/client.ipc"
    sender = multiprocessing.get_context("spawn").Process(
        target=_publish_blocking, args=(endpoint, duration_s + 1.0), daemon=True)
    sender.start()
    clock = MonotonicClock()
    costs_ns: list[int] = []
    fresh = 0
    with Client(endpoint) as client, progress_seconds(duration_s, desc="bench client") as bar:
        time.sleep(1.0)  # connect and let the first messages arrive
        period_ns = round(1e9 / rate_hz)
        next_ns = start_ns = clock.now_ns()
        last_seq = -1
        end_ns = next_ns + round(duration_s * 1e9)
        while next_ns < end_ns:
            clock.sleep_until(next_ns)
            start = clock.now_ns()
            latest = client.latest("pred.action")
            costs_ns.append(clock.now_ns() - start)
            if latest is not None and latest.seq != last_seq:
                fresh += 1
                last_seq = latest.seq
            next_ns += period_ns
            bar.at((next_ns - start_ns) / 1e9)  # outside the timed call
    sender.join(5)
    costs_us = np.asarray(costs_ns) / 1e3
    p50, p99 = np.percentile(costs_us, [50, 99])
    return {"bench": "client", "calls": len(costs_ns), "rate_hz": rate_hz,
            "latest_us": {"p50": round(float(p50), 2), "p99": round(float(p99), 2),
                          "max": round(float(costs_us.max()), 2)},
            "calls_with_a_new_chunk": fresh}
