"""`fusion-node bench pipeline`: run the embedded default and measure what a control loop sees.

The node runs in this process with its simulated drivers in their own processes; a separate
subscriber process measures when each prediction arrives relative to its deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np

from fusion_node.clock import MonotonicClock
from fusion_node.config import NodeConfig, load_config
from fusion_node.node import Node
from fusion_node.progress import progress_seconds_async

_SUBSCRIBER_GRACE_S = 1.0


def _summary_ms(values_ns: list[int]) -> dict[str, float]:
    if not values_ns:
        return {"count": 0}
    values = np.asarray(values_ns, np.float64) / 1e6
    p50, p99 = np.percentile(values, [50, 99])
    return {"count": len(values), "p50_ms": round(float(p50), 4),
            "p99_ms": round(float(p99), 4), "max_ms": round(float(values.max()), 4)}


def subscribe(endpoint: str, duration_s: float) -> dict[str, Any]:
    """Receive predictions for `duration_s`, as a control loop would (at real-time priority
    where allowed); arrival time minus deadline per topic. `samples` holds, per topic, one
    [t_ref_ns, t_publish_ns - deadline_ns, t_receive_ns - deadline_ns, late] per prediction."""
    from fusion_node.host.threads import raise_thread_priority, realtime_context
    from fusion_node.protocol import Prediction
    from fusion_node.transport import Subscriber

    priority = raise_thread_priority()
    clock = MonotonicClock()
    context = realtime_context()
    subscriber = Subscriber(context, [endpoint], clock, topics=["pred."])
    arrivals: dict[str, list[int]] = {}
    late: dict[str, int] = {}
    samples: dict[str, list[list[int]]] = {}
    end = time.monotonic() + duration_s
    while time.monotonic() < end:
        msg = subscriber.recv(timeout_ms=100)
        if isinstance(msg, Prediction):
            arrivals.setdefault(msg.stream, []).append(msg.t_receive_ns - msg.deadline_ns)
            late[msg.stream] = late.get(msg.stream, 0) + int(msg.late)
            samples.setdefault(msg.stream, []).append(
                [msg.t_ref_ns, msg.t_publish_ns - msg.deadline_ns,
                 msg.t_receive_ns - msg.deadline_ns, int(msg.late)])
    subscriber.close()
    context.term()
    return {"subscriber_priority": priority, "samples": samples,
            **{topic: {**_summary_ms(values), "late_flags": late[topic]}
               for topic, values in arrivals.items()}}


async def _run(config: NodeConfig, duration_s: float) -> tuple[Node, dict[str, Any], float]:
    node = Node(config)
    stop = asyncio.Event()
    run = asyncio.create_task(node.run(stop))
    await node.ready.wait()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fusion_node.bench.pipeline", node.pub_endpoint,
        str(duration_s), stdout=subprocess.PIPE)
    async with progress_seconds_async(duration_s, desc="bench pipeline"):
        await asyncio.sleep(duration_s + _SUBSCRIBER_GRACE_S)
    stop.set()
    await run
    stdout, _ = await process.communicate()
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    return node, json.loads(stdout), cpu.ru_utime + cpu.ru_stime


def _window_cost_after_run(node: Node, repeats: int = 500) -> dict[str, Any]:
    """Window assembly on the run's own buffer once the node has stopped: the cost of the
    algorithm without other threads competing for the GIL and the cores."""
    from fusion_node.clock import thread_cpu_ns

    result = {}
    for runner in node.runners:
        newest = max(st.last_capture_ns for st in node.buffer.stats.values())
        t_ref = newest - runner.latency_ns
        costs = []
        for _ in range(repeats):
            start = thread_cpu_ns()
            node.buffer.window(t_ref, runner.binding.spec)
            costs.append(thread_cpu_ns() - start)
        result[runner.name] = _summary_ms(costs)
    return result


def run_pipeline_bench(duration_s: float = 20.0,
                       samples: dict[str, Any] | None = None) -> dict[str, Any]:
    """Figures for the embedded default: rates, deadline misses, jitter, window cost.

    `samples`, if given, receives the subscriber's per-prediction rows (see `subscribe`)
    under "predictions", for plots; the result itself holds only summaries."""
    config = dataclasses.replace(load_config(), pub="tcp://127.0.0.1:*")
    started = time.monotonic()
    node, arrivals, cpu_s = asyncio.run(_run(config, duration_s))
    rows = arrivals.pop("samples", {})
    if samples is not None:
        samples["predictions"] = rows
    wall_s = time.monotonic() - started
    health = node.health()
    engines = {}
    for runner, engine_config in zip(node.runners, config.engines):
        stats = runner.stats.summary()
        engines[runner.name] = {
            "topic": runner.topic, "rate_hz": engine_config.rate_hz,
            "declared_latency_ms": engine_config.latency_ns / 1e6,
            "published": stats["published"], "deadline_misses": stats["deadline_misses"],
            "skipped_ticks": stats["skipped_ticks"],
            "missing_required": stats["missing_required"],
            "window_assembly_cpu": stats["window_cpu"], "window_assembly_wall": stats["window"],
            "inference": stats["infer"],
            "ready_after_t_ref": stats["ready_after_ref"],
        }
    return {
        "duration_s": duration_s,
        "engines": engines,
        "publish_minus_deadline": health["publish_jitter"],
        "arrival_after_deadline": arrivals,
        "window_assembly_quiet": _window_cost_after_run(node),
        "node_cpu_fraction_of_one_core": round(cpu_s / wall_s, 3),
        "streams": {s: {"received": v["received"], "evicted": v["evicted"],
                        "seq_gaps": v["seq_gaps"]} for s, v in health["streams"].items()},
    }


if __name__ == "__main__":
    print(json.dumps(subscribe(sys.argv[1], float(sys.argv[2]))))
