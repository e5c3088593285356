"""`fusion-node bench scale`: what more cameras, microphone channels and engines cost.

Each configuration is the embedded default grown along one axis: extra simulated 640×480
cameras at 30 fps (each in its own driver process, as a real camera driver would be), a
microphone with more channels (the speech engine mixes them to mono), and extra engines (a
second speech and a second action engine on the same inputs, each with its own topic). The
simulated arm (joints and its 25 fps scene camera) runs in every configuration.

For each, the node runs in this process for `duration_s` after a warm-up, and the bench
reads CPU time from /proc: per driver process (the cost of a stream at its source), per node
thread (each engine, the receiver, the publisher), and the whole node. It reports each
engine's ready-after-t_ref p99 and deadline misses, and the largest configuration that kept
0 misses on this machine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
from importlib import resources
from typing import Any

from fusion_node.config import NodeConfig, parse_config
from fusion_node.node import Node
from fusion_node.progress import progress

WARM_UP_S = 2.0
CAMERA_COUNTS = (1, 2, 4)
MIC_CHANNELS = (1, 4)
ENGINE_COUNTS = (1, 2, 3, 4)
# Along one axis at a time from the default (1 camera, 1 channel, 2 engines), then the issue's
# target (4 cameras, 1 channel, both engines) and everything at once.
SWEEP: tuple[tuple[int, int, int], ...] = (
    *((c, 1, 2) for c in CAMERA_COUNTS),
    *((1, m, 2) for m in MIC_CHANNELS if m != 1),
    *((1, 1, e) for e in ENGINE_COUNTS if e != 2),
    (4, 4, 4),
)
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def scale_config(cameras: int, mic_channels: int, engines: int) -> NodeConfig:
    """The embedded default with `cameras` face cameras, a `mic_channels`-channel microphone
    and the first `engines` of speech, action, speech2, action2."""
    text = (resources.files("fusion_node") / "default.toml").read_text()
    config = parse_config(text, "default.toml")
    blocks = [text]
    for index in range(1, cameras):
        blocks.append(f'[[drivers]]\nkind = "sim_camera"\nstream = "camera.extra{index}"\n'
                      "config = { fps = 30 }\n")
    speech, action = config.engines
    extra = [("speech2", speech), ("action2", action)][: max(0, engines - 2)]
    for name, like in extra:
        blocks.append(_engine_block(name, like, text))
    merged = parse_config("\n".join(blocks), f"scale {cameras}/{mic_channels}/{engines}")
    # The default's own microphone, whatever its chunking, with more channels.
    drivers = [dataclasses.replace(d, config={**d.config, "channels": mic_channels})
               if d.kind == "sim_microphone" else d for d in merged.drivers]
    return dataclasses.replace(merged, drivers=drivers, engines=merged.engines[:engines],
                               pub="tcp://127.0.0.1:*")


def _engine_block(name: str, like: Any, text: str) -> str:
    """A copy of `like`'s [[engines]] table from `text`, renamed, on topic pred.<name>."""
    start = text.index(f'name = "{like.name}"')
    start = text.rindex("[[engines]]", 0, start)
    end = text.find("[[", start + 2)
    block = text[start:end if end >= 0 else len(text)]
    return (block.replace(f'name = "{like.name}"', f'name = "{name}"', 1)
            .replace(f'topic = "{like.topic}"', f'topic = "pred.{name}"', 1))


def _cpu_s(path: str) -> float:
    """utime + stime of a /proc .../stat file, in seconds (0 if it has gone)."""
    try:
        with open(path) as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def _cpu_snapshot(node: Node) -> dict[str, float]:
    snapshot = {"node": _cpu_s(f"/proc/{os.getpid()}/stat")}
    for thread in threading.enumerate():
        if thread.native_id is not None and (thread.name.startswith("engine ")
                                             or thread.name in ("receiver", "publisher")):
            snapshot[f"thread {thread.name}"] = _cpu_s(
                f"/proc/{os.getpid()}/task/{thread.native_id}/stat")
    for stream, process in node.driver_processes.items():
        if process.pid is not None:
            snapshot[f"driver {stream}"] = _cpu_s(f"/proc/{process.pid}/stat")
    return snapshot


async def _measure(config: NodeConfig, duration_s: float) -> dict[str, Any]:
    node = Node(config)
    stop = asyncio.Event()
    run = asyncio.create_task(node.run(stop))
    await asyncio.wait_for(node.ready.wait(), 60)
    await asyncio.sleep(WARM_UP_S)
    before, started = _cpu_snapshot(node), time.monotonic()
    counts_before = {r.name: (r.stats.published, r.stats.deadline_misses) for r in node.runners}
    await asyncio.sleep(duration_s)
    after, elapsed = _cpu_snapshot(node), time.monotonic() - started
    engines = {}
    for runner in node.runners:
        published, misses = counts_before[runner.name]
        engines[runner.name] = {
            "published": runner.stats.published - published,
            "deadline_misses": runner.stats.deadline_misses - misses,
            "ready_after_t_ref_p99_ms": runner.stats.ready_after_ref_ns.summary().get("p99_ms"),
            "declared_latency_ms": runner.latency_ns / 1e6}
    stop.set()
    await run
    cpu = {name: round((after[name] - before.get(name, 0.0)) / elapsed, 3)
           for name in after}
    return {"engines": engines, "cpu_cores": cpu}


def run_scale_bench(duration_s: float = 20.0,
                    sweep: tuple[tuple[int, int, int], ...] = SWEEP) -> dict[str, Any]:
    """One row per (cameras, mic channels, engines): CPU in cores per driver process, per
    node thread and for the whole node; per engine ready-after-t_ref p99 and misses."""
    rows = []
    for cameras, channels, engines in progress(sweep, desc="bench scale", unit="config"):
        measured = asyncio.run(_measure(scale_config(cameras, channels, engines), duration_s))
        misses = sum(e["deadline_misses"] for e in measured["engines"].values())
        rows.append({"cameras": cameras, "mic_channels": channels, "engine_count": engines,
                     "deadline_misses": misses, **measured})
    clean = [r for r in rows if r["deadline_misses"] == 0]
    largest = max(clean, key=lambda r: (r["cameras"] * r["mic_channels"] * r["engine_count"],
                                        r["cameras"]), default=None)
    return {"duration_s": duration_s, "cpus": os.cpu_count(), "rows": rows,
            "largest_without_misses": None if largest is None else {
                k: largest[k] for k in ("cameras", "mic_channels", "engine_count")}}
