"""`fusion-node bench clock`: the remote-clock mapping against a simulated source whose
offset, drift and network delay are known."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any


def run_clock_bench(duration_s: float = 10.0, offset_s: float = 2.5, drift_ppm: float = 50.0,
                    delay_ms: tuple[float, float] = (0.1, 5.0), seed: int = 0) -> dict[str, Any]:
    """A simulated remote source in a second process, over real sockets: the mapping error
    and published uncertainty after each burst."""
    import zmq

    from fusion_node.clock import MonotonicClock
    from fusion_node.progress import progress_seconds
    from fusion_node.remote_clock import ClockError, ClockTracker, SimulatedRemoteClock

    command = [sys.executable, "-m", "fusion_node.remote_clock", "serve", "tcp://127.0.0.1:*",
               "--sim-offset-s", str(offset_s), "--sim-drift-ppm", str(drift_ppm),
               "--sim-delay-ms", str(delay_ms[0]), str(delay_ms[1]), "--seed", str(seed)]
    truth = SimulatedRemoteClock(round(offset_s * 1e9), drift_ppm * 1e-6)
    clock = MonotonicClock()
    context = zmq.Context()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    tracker = None
    series = []
    bar = progress_seconds(duration_s, desc="bench clock")
    try:
        line = process.stdout.readline() if process.stdout else ""
        if not line:
            raise ClockError(f"simulated clock source failed to start ({' '.join(command)})")
        tracker = ClockTracker(context, json.loads(line)["endpoint"], clock)
        start_ns = next_ns = clock.now_ns()
        while (now_ns := clock.now_ns()) - start_ns < duration_s * 1e9:
            mapping = tracker.burst_blocking()
            if mapping is not None:
                t_remote_ns = truth.remote_of(clock.now_ns())
                t_local_ns = truth.local_of(t_remote_ns)
                error_ns = mapping.to_local_ns(t_remote_ns) - t_local_ns
                uncertainty_ns = mapping.uncertainty_at_ns(t_local_ns)
                series.append({"t_s": round((now_ns - start_ns) / 1e9, 3),
                               "error_ms": round(error_ns / 1e6, 4),
                               "uncertainty_ms": round(uncertainty_ns / 1e6, 4),
                               "covered": abs(error_ns) <= uncertainty_ns})
            next_ns += tracker.period_ns
            bar.at((clock.now_ns() - start_ns) / 1e9)
            time.sleep(max(0.0, (next_ns - clock.now_ns()) / 1e9))
    finally:
        bar.close()
        if tracker is not None:
            tracker.close()
        process.terminate()
        process.wait(5)
        context.term()
    if not series:
        raise ClockError("the simulated clock source never answered")
    final = series[-1]
    return {"offset_s": offset_s, "drift_ppm": drift_ppm, "one_way_delay_ms": list(delay_ms),
            "duration_s": duration_s, "final_error_ms": final["error_ms"],
            "final_uncertainty_ms": final["uncertainty_ms"],
            "covered_fraction": round(sum(s["covered"] for s in series) / len(series), 4),
            "timeouts": tracker.timeouts if tracker else 0, "series": series}
